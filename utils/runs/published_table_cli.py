"""The reproduce matrix: each published cell, the command that runs it, the published numbers and ours.

    python tools/published_table.py [--results RUN_DIR...] [--all]

One row per (dataset, model, bit-width) of ``utils/reports/published_numbers.csv``: the run script of that
cell, the best earlier method (AdaDFQ's table) and GranQ's abstract claim where one exists. "ours" is
"not run yet" unless ``--results`` gives runs: then the mean ± std of ``student_top1`` over the runs of
that cell that used GranQ's settings (act_mode granq, weight granularity kernel), a teacher with
weights (not random) and the full schedule of the cell's config (epochs x iterations). Give only runs
with the published teachers and test sets. ``--all`` also prints every earlier method's number.
The command line of ``tools/published_table.py``; README.md holds the default output between its
``published-table`` markers (a test keeps them equal).
"""

import argparse
import os
import sys

from ..reports.published import (
    DATASET_NAMES,
    best_earlier,
    bits_label,
    granq_claim,
    methods_table,
    paper_model,
    published_index,
)
from ..reports.results import format_cell, load_summaries
from ..system.errors import UserError, report_errors
from .config import load_options

__all__ = ["cells", "command", "config_path", "main", "ours", "reproduce_table", "script"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGENET_DATA = " --set dataPath=/path/to/imagenet"
# (dataset, paper model) -> (folder, config, run script with {bits}, extra arguments the command needs).
CELLS = {
    ("cifar10", "ResNet-20"): ("CIFAR", "cifar10_resnet20", "run_{bits}bit.sh", ""),
    ("cifar100", "ResNet-20"): ("CIFAR", "cifar100_resnet20", "run_{bits}bit_cifar100.sh", ""),
    ("imagenet", "ResNet-18"): ("ImageNet", "imagenet_res18", "run_{bits}bit_res18.sh", IMAGENET_DATA),
    ("imagenet", "ResNet-50"): ("ImageNet", "imagenet_res50", "run_{bits}bit_res50.sh", IMAGENET_DATA),
    ("imagenet", "MobileNetV2"): ("ImageNet", "imagenet_MV2", "run_{bits}bit_MV2.sh", IMAGENET_DATA),
}
DATASET_ORDER = ("cifar10", "cifar100", "imagenet")
NOT_RUN = "not run yet"


def cells() -> list[tuple[str, str, str]]:
    """The (dataset, model, bits) cells with published quantized numbers, in table order."""
    keys = {key for key in published_index() if key[2] != "FP"}
    missing = sorted({(d, m) for d, m, _ in keys} - CELLS.keys())
    if missing:
        raise UserError(f"no run script known for {missing}: add it to CELLS in {__file__}")
    models = list(CELLS)
    return sorted(keys, key=lambda k: (DATASET_ORDER.index(k[0]), models.index(k[:2]), k[2]))


def script(dataset: str, model: str, bits: str) -> str:
    """Path of the run script of a cell, relative to the repository root."""
    folder, _, name, _ = CELLS[dataset, model]
    return f"{folder}/{name.format(bits=bits[1])}"


def command(dataset: str, model: str, bits: str) -> str:
    return f"bash {script(dataset, model, bits)}{CELLS[dataset, model][3]}"


def config_path(dataset: str, model: str) -> str:
    folder, config, _, _ = CELLS[dataset, model]
    return os.path.join(ROOT, folder, f"{config}.hocon")


def ours(summaries: list[dict]) -> dict[tuple[str, str, str], str]:
    """``student_top1`` over the full-length GranQ runs of each cell, formatted as a results-table cell."""
    schedules = {}
    values: dict[tuple[str, str, str], list[float]] = {}
    for s in summaries:
        key = (s["dataset"], paper_model(s["network"]), bits_label(s["qw"], s["qa"]))
        if key[:2] not in CELLS or s.get("student_top1") is None:
            continue
        if (s["act_mode"], s["weight_granularity"]) != ("granq", "kernel") or s.get("teacher_weights") == "random":
            continue
        if key[:2] not in schedules:
            options = load_options(config_path(*key[:2]))
            schedules[key[:2]] = (options.nEpochs, options.iters_per_epoch)
        if (s.get("epochs"), s.get("iters_per_epoch")) == schedules[key[:2]]:
            values.setdefault(key, []).append(s["student_top1"])
    return {key: format_cell(v) for key, v in values.items()}


def reproduce_table(results: dict | None = None) -> str:
    """The reproduce matrix as markdown, "ours" from ``results`` (cell -> text) or "not run yet"."""
    results = results or {}
    index = published_index()
    lines = ["| dataset | model (FP top-1) | bits | command | best earlier method | GranQ (abstract) | ours |",
             "|---|---|---|---|---|---|---|"]
    for dataset, model, bits in cells():
        rows = index[dataset, model, bits]
        fp = index.get((dataset, model, "FP"))
        name = f"{model} ({fp[0].label()})" if fp else model
        lines.append(f"| {DATASET_NAMES[dataset]} | {name} | {bits} | `{command(dataset, model, bits)}` | "
                     f"{best_earlier(rows)} | {granq_claim(rows)} | {results.get((dataset, model, bits), NOT_RUN)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", nargs="+", metavar="RUN_DIR",
                        help="run directories or folders of runs whose summary.json fill the 'ours' column")
    parser.add_argument("--all", action="store_true", help="also print every earlier method's published number")
    args = parser.parse_args(argv)

    def command():
        results = ours(load_summaries(args.results)) if args.results else {}
        text = reproduce_table(results)
        if args.all:
            text += "\n" + "\n".join(methods_table(cells())) + "\n"
        sys.stdout.write(text)

    return report_errors(command)
