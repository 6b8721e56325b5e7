"""Paper-style markdown table of finished runs, with the published numbers beside each cell.

    python tools/results_table.py RUN_DIR_OR_FOLDER... [--metric student_top1|best_top1] [--output FILE]

Every summary.json under the given paths counts once; runs that share dataset, network, teacher,
bit-widths, act_mode, weight_granularity, training length and the other options of their config.hocon
(all but those that only place or name a run) are averaged (mean ± std over seeds); runs that differ in
such an option, a schedule for instance, get one table per value, named in its heading. The command line of
``tools/results_table.py``.
"""

import argparse
import sys

from ..system.errors import UserError, report_errors
from .results import METRICS, load_summaries, results_markdown

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR",
                        help="run directories, folders holding runs (searched recursively) or summary.json files")
    parser.add_argument("--metric", choices=METRICS, default="student_top1",
                        help="student_top1: after the last epoch (default); best_top1: best evaluated epoch")
    parser.add_argument("--output", metavar="FILE", help="also write the markdown to FILE")
    args = parser.parse_args(argv)

    def command():
        summaries = load_summaries(args.paths)
        if not summaries:
            raise UserError(f"no summary.json under {', '.join(args.paths)}: runs write it when they finish")
        text = results_markdown(summaries, args.metric)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        sys.stdout.write(text)

    return report_errors(command)
