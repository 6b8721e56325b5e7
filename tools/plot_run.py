"""Draw accuracy.png and losses.png into each run directory from its metrics.jsonl.

    python tools/plot_run.py RUN_DIR...

See utils/reports/plot_run_cli.py and docs/tools.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.reports.plot_run_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
