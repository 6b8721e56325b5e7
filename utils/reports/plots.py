"""PNG plots of a run's ``metrics.jsonl``: accuracy per epoch and each loss term per epoch.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting works without a display
and never changes the global backend of a program that imports this module.
"""

from __future__ import annotations

import logging
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..training.metrics_writer import read_metrics

__all__ = ["ACCURACY_PNG", "LOSS_TERMS", "LOSSES_PNG", "plot_run"]

logger = logging.getLogger(__name__)

ACCURACY_PNG = "accuracy.png"
LOSSES_PNG = "losses.png"
# The generator's objective and its three terms, then the student's distillation loss.
LOSS_TERMS = ("loss_G", "marginal", "onehot", "bns", "loss_S")
LOSS_TITLES = {"loss_G": "loss_G (generator: marginal + beta onehot + gamma bns)", "marginal": "marginal",
               "onehot": "onehot", "bns": "bns (BatchNorm statistics)", "loss_S": "loss_S (student distillation)"}


def _series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    """(epochs, values) of the records that have ``key``: epochs without evaluation have no accuracy."""
    points = [(r["epoch"], scale * r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_accuracy(records: list[dict], path: str, title: str) -> None:
    # Two panels: top-1 on the test set gets its own axis so that differences of a few tenths between
    # student and teacher stay visible next to top-5 and the accuracy on generated images.
    figure = _new_figure(7, 7)
    figure.suptitle(title, fontsize="small")
    top1_axes, other_axes = figure.subplots(2, 1, sharex=True)
    for axes, curves in (
        (top1_axes, (("student_top1", "student top-1", "o-", 1.0),
                     ("best_top1", "best student top-1 so far", "--", 1.0))),
        (other_axes, (("student_top5", "student top-5 (test set)", "o:", 1.0),
                      ("teacher_acc", "teacher accuracy on generated images", "s-", 100.0))),
    ):
        for key, label, style, scale in curves:
            epochs, values = _series(records, key, scale)
            if epochs:
                axes.plot(epochs, values, style, label=label, markersize=4,
                          drawstyle="steps-post" if key == "best_top1" else "default")
    # teacher_top1 is one number per run, measured before training: a reference line.
    teacher = next((r["teacher_top1"] for r in records if r.get("teacher_top1") is not None), None)
    if teacher is not None:
        top1_axes.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher top-1 ({teacher:.2f})")
    top1_axes.set_title("top-1 on the test set", fontsize="medium")
    other_axes.set_title("top-5 on the test set; teacher on the generator's images", fontsize="medium")
    other_axes.set_xlabel("epoch")
    other_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (top1_axes, other_axes):
        axes.set_ylabel("accuracy (%)")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize="small")
        else:
            axes.text(0.5, 0.5, "nothing recorded yet", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path, dpi=100)


def _plot_losses(records: list[dict], path: str, title: str) -> None:
    # One panel per term: their scales differ by orders of magnitude and the KD loss is negative,
    # so neither one shared axis nor a log axis would show them all.
    panels = [key for key in LOSS_TERMS if any(key in r for r in records)] + ["learning rates"]
    columns = 3
    rows = -(-len(panels) // columns)
    figure = _new_figure(4 * columns, 3 * rows)
    figure.suptitle(title, fontsize="small")
    for index, key in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, index)
        if key == "learning rates":
            for lr_key in ("lr_S", "lr_G"):
                epochs, values = _series(records, lr_key)
                if epochs:
                    axes.plot(epochs, values, "o-", markersize=3, label=lr_key)
            axes.set_yscale("log")
            axes.legend(fontsize="small")
        else:
            axes.plot(*_series(records, key), "o-", markersize=3)
        axes.set_title(LOSS_TITLES.get(key, key), fontsize="medium")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def plot_run(run_dir: str) -> list[str]:
    """Write ``accuracy.png`` and ``losses.png`` into ``run_dir`` from its ``metrics.jsonl``.

    Returns the paths written; [] when the run has no per-epoch records (``nEpochs = 0``).
    """
    records = read_metrics(run_dir)
    if not records:
        logger.info("no per-epoch metrics in %s: no plots", run_dir)
        return []
    title = os.path.basename(os.path.normpath(run_dir))
    paths = [os.path.join(run_dir, ACCURACY_PNG), os.path.join(run_dir, LOSSES_PNG)]
    _plot_accuracy(records, paths[0], title)
    _plot_losses(records, paths[1], title)
    return paths
