"""Draw accuracy.png and losses.png into each run directory from its metrics.jsonl.

    python tools/plot_run.py RUN_DIR...

Runs draw these themselves when they finish; this redraws them, e.g. while a run is still going. The command
line of ``tools/plot_run.py``.
"""

import argparse
import os
import sys

from ..system.errors import UserError
from .plots import plot_run

__all__ = ["main"]


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
