"""Paper-style markdown table of finished runs, with the published numbers beside each cell.

    python tools/results_table.py RUN_DIR_OR_FOLDER... [--metric student_top1|best_top1] [--output FILE]

See utils/reports/results_table_cli.py and docs/tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.reports.results_table_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
