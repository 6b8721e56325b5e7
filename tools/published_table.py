"""The reproduce matrix: each published cell, the command that runs it, the published numbers and ours.

    python tools/published_table.py [--results RUN_DIR...] [--all]

See utils/runs/published_table_cli.py and docs/tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.runs.published_table_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
