"""Draw accuracy.png and losses.png into each run directory from its metrics.jsonl.

    python tools/plot_run.py RUN_DIR...

Runs draw these themselves when they finish; this redraws them, e.g. while a run is still going.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.reports.plots import plot_run  # noqa: E402
from utils.system.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        try:
            if not os.path.isdir(run_dir):
                raise UserError(f"{run_dir!r} is not a directory")
            paths = plot_run(run_dir)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        if not paths:
            print(f"{run_dir}: no metrics.jsonl records (no finished epoch): nothing to plot", file=sys.stderr)
            status = 2
        for path in paths:
            print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
