"""Collect runs' ``summary.json`` files into paper-style markdown tables with the published numbers beside.

Layout, one table per quantizer setting (act_mode, weight_granularity), training length and value of any
other option that differs between runs of one cell (read from each run's ``config.hocon``, see
:data:`NOT_SETTINGS`):
rows are dataset and model (with the teacher), columns the bit-widths (W3A3, W4A4, W5A5 always, others
when present); each cell is the mean ± sample standard deviation of the chosen metric over the runs
(seeds) that share the row, the bit-width and the setting, with their count, and a "paper" column beside
each bit-width gives the best earlier method and GranQ's claim. A reference table with every published
number of the rows shown follows.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass

from pyhocon import ConfigFactory

from ..system.errors import UserError
from ..training.metrics_writer import read_metrics
from .published import (
    DATASET_NAMES,
    EARLIER_METHODS,
    best_earlier,
    bits_label,
    methods_table,
    paper_model,
    published_index,
)

__all__ = ["BASELINE_VARIANT", "METRICS", "STANDARD_BITS", "find_summaries", "format_cell", "load_summaries",
           "mean_std", "results_markdown", "student_seconds_per_iteration", "variants_markdown"]

logger = logging.getLogger(__name__)

METRICS = ("student_top1", "best_top1")
BASELINE_VARIANT = "baseline"  # the variant the others are compared with in variants_markdown
STANDARD_BITS = ((3, 3), (4, 4), (5, 5))
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.hocon"  # the run's resolved options, beside its summary
# The fields of a summary that the rows and the tables show: every summary.json of this project has them.
SHOWN = ("dataset", "network", "qw", "qa", "act_mode", "weight_granularity")
# Options that place or name a run, or change its speed or random stream but not its method, and those the
# rows and tables already show. Runs of one cell that differ in any other option (a schedule, a loss weight, a batch
# size) are kept apart, each in a table that names its value, rather than averaged as seeds. granq_impl is the
# former name of quant_impl, in the config.hocon of runs made under it.
NOT_SETTINGS = frozenset({"save_path", "dataPath", "experimentID", "GPU", "nGPU", "visible_devices", "nThreads",
                          "quant_impl", "granq_impl", "deterministic", "log_interval", "tensorboard", "test_batch_size",
                          "teacher_weights", "nClasses", "nEpochs", "iters_per_epoch", *SHOWN})

ACT_MODE_TEXT = {"granq": "one range per (sample, channel), GranQ", "layerwise": "one range per layer, GDFQ family",
                 "channel": "one range per channel, shared by all samples"}
GRANULARITY_TEXT = {
    "kernel": "one range per (out, in) kernel, as GranQ's published numbers; the earlier methods quantize "
              "per output channel",
    "channel": "one range per output channel, as the earlier methods; GranQ's published numbers quantize "
               "per (out, in) kernel",
}


def find_summaries(paths) -> list[str]:
    """``summary.json`` files under ``paths`` (files, run directories or folders searched recursively),
    each once, sorted."""
    found = set()
    for path in paths:
        if os.path.isfile(path):
            found.add(os.path.realpath(path))
        elif os.path.isdir(path):
            for folder, _, files in os.walk(path):
                if SUMMARY_FILE in files:
                    found.add(os.path.realpath(os.path.join(folder, SUMMARY_FILE)))
        else:
            raise UserError(f"{path!r} does not exist; give run directories, folders of runs or summary.json files")
    return sorted(found)


def load_summaries(paths) -> list[dict]:
    """The summaries found under ``paths``, each with its file path under ``summary_path``."""
    summaries = []
    for file in find_summaries(paths):
        try:
            with open(file) as f:
                summary = json.load(f)
        except ValueError as error:
            raise UserError(f"{file} is not valid JSON ({error})") from None
        missing = [k for k in SHOWN if k not in summary]
        if missing:
            raise UserError(f"{file} lacks {', '.join(missing)}: is it a summary.json of this project?")
        summaries.append({**summary, "summary_path": file, "options": _run_options(file)})
    return summaries


def _run_options(summary_file: str) -> dict:
    """The options in the ``config.hocon`` beside ``summary_file``; {} where there is none."""
    path = os.path.join(os.path.dirname(summary_file), CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        return dict(ConfigFactory.parse_file(path).as_plain_ordered_dict())
    except Exception as error:  # pyhocon raises its own and pyparsing's exceptions
        logger.warning("%s is unreadable (%s): runs are compared without its options", path, error)
        return {}


def mean_std(values) -> tuple[float, float | None, int]:
    """(mean, sample standard deviation or None for one value, count).

    >>> mean_std([83.0, 84.0, 85.0])
    (84.0, 1.0, 3)
    """
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std, len(values)


def format_cell(values) -> str:
    """``mean ± std (n=k)``; one run has no spread to show.

    >>> format_cell([83.0, 84.0, 85.5])
    '84.17 ± 1.26 (n=3)'
    >>> format_cell([70.0])
    '70.00 (n=1)'
    """
    mean, std, n = mean_std(values)
    return f"{mean:.2f} (n=1)" if std is None else f"{mean:.2f} ± {std:.2f} (n={n})"


@dataclass(frozen=True, order=True)
class _Row:
    dataset: str
    network: str
    teacher: str  # file name of the teacher weights, so runs of different teachers are never averaged


@dataclass(frozen=True, order=True)
class _Setting:
    act_mode: str
    weight_granularity: str
    epochs: int
    iters_per_epoch: int
    options: tuple = ()  # (key, value as text) of the options that tell this setting's runs from others
    variant: str = ""  # the name of a reproduce plan's variant the runs belong to


def _cell(summary: dict) -> tuple:
    """What identifies one table cell: runs with the same cell are seeds, averaged together."""
    return (summary["dataset"], summary["network"], _teacher_name(summary), summary["qw"], summary["qa"],
            summary["act_mode"], summary["weight_granularity"], summary.get("epochs", -1),
            summary.get("iters_per_epoch", -1))


def _differing_options(runs: list[dict]) -> list[str]:
    """The options (beyond :data:`NOT_SETTINGS`) whose values differ between runs of one cell. Runs without
    a readable ``config.hocon`` take no part here; their tables show ``?`` for these options."""
    cells = defaultdict(list)
    for s in runs:
        if s.get("options"):
            cells[_cell(s)].append(s["options"])
    keys = set()
    for options in cells.values():
        for key in set().union(*options) - NOT_SETTINGS:
            if len({json.dumps(o.get(key)) for o in options}) > 1:
                keys.add(key)
    return sorted(keys)


def _option_text(options: dict, key: str) -> str:
    value = options.get(key)
    return "?" if value is None else value if isinstance(value, str) else json.dumps(value)


def _teacher_name(summary: dict) -> str:
    source = summary.get("teacher_weights") or "unknown"
    return source if source in ("random", "unknown") else os.path.basename(source)


def _paper_cell(published: list) -> str:
    parts = [best_earlier(published)] if any(p.method in EARLIER_METHODS for p in published) else []
    parts += [f"GranQ {p.label()}" for p in published if p.method == "GranQ"]
    return "; ".join(parts) or "–"


def _table(setting: _Setting, runs: list[dict], metric: str, published) -> list[str]:
    bit_pairs = sorted(set(STANDARD_BITS) | {(s["qw"], s["qa"]) for s in runs})
    cells = defaultdict(list)
    teachers = defaultdict(list)
    for s in runs:
        row = _Row(s["dataset"], s["network"], _teacher_name(s))
        cells[row, (s["qw"], s["qa"])].append(s[metric])
        if s.get("teacher_top1") is not None:
            teachers[row].append(s["teacher_top1"])
    header = ["dataset", "model", "teacher weights", "FP top-1: ours (paper)"]
    for qw, qa in bit_pairs:
        header += [bits_label(qw, qa), f"paper {bits_label(qw, qa)}"]
    lines = [
        (f"### variant {setting.variant}: " if setting.variant else "### ")
        + f"act_mode = {setting.act_mode}, weight_granularity = {setting.weight_granularity}, "
        f"{setting.epochs} epochs x {setting.iters_per_epoch} iterations"
        + "".join(f", {key} = {value}" for key, value in setting.options),
        "",
        f"Activations: {ACT_MODE_TEXT.get(setting.act_mode, setting.act_mode)}. "
        f"Weights: {GRANULARITY_TEXT.get(setting.weight_granularity, setting.weight_granularity)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in sorted({row for row, _ in cells}):
        model = paper_model(row.network)
        fp = [p for p in published.get((row.dataset, model, "FP"), [])]
        ours = f"{statistics.fmean(teachers[row]):.2f}" if teachers[row] else "–"
        paper_fp = fp[0].label() if fp else "–"
        line = [DATASET_NAMES.get(row.dataset, row.dataset), f"{model} (`{row.network}`)", f"`{row.teacher}`",
                f"{ours} ({paper_fp})"]
        for qw, qa in bit_pairs:
            values = cells.get((row, (qw, qa)))
            line += [format_cell(values) if values else "–",
                     _paper_cell(published.get((row.dataset, model, bits_label(qw, qa)), []))]
        lines.append("| " + " | ".join(line) + " |")
    return lines


def results_markdown(summaries: list[dict], metric: str = "student_top1") -> str:
    """Markdown tables of ``summaries`` (from :func:`load_summaries`) for ``metric``."""
    if metric not in METRICS:
        raise UserError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    usable = []
    for s in summaries:
        if s.get(metric) is None:
            logger.warning("%s has no %s; left out", s.get("summary_path", "a summary"), metric)
        else:
            usable.append(s)
    if not usable:
        raise UserError(f"no run with a {metric} to tabulate")
    settings = defaultdict(list)
    differing = _differing_options(usable)
    for s in usable:
        options = tuple((key, _option_text(s.get("options", {}), key)) for key in differing)
        settings[_Setting(s["act_mode"], s["weight_granularity"], s.get("epochs", -1),
                          s.get("iters_per_epoch", -1), options, s.get("variant", ""))].append(s)
    published = published_index()
    what = {"student_top1": "top-1 (%) of the student after the last epoch",
            "best_top1": "best top-1 (%) over the evaluated epochs (chosen on the test set, so optimistic)"}[metric]
    lines = [f"Metric: `{metric}`, {what}; mean ± sample standard deviation over runs (seeds), n = runs. "
             f"Each \"paper\" column: the best earlier method and GranQ's claim where one exists.", ""]
    shown = set()
    for setting in sorted(settings):
        lines += _table(setting, settings[setting], metric, published) + [""]
        for s in settings[setting]:
            for qw, qa in set(STANDARD_BITS) | {(s["qw"], s["qa"])}:
                shown.add((s["dataset"], paper_model(s["network"]), bits_label(qw, qa)))
    return "\n".join(lines + methods_table(sorted(shown), "Published top-1 (%) for these rows")) + "\n"


def student_seconds_per_iteration(summary: dict) -> float | None:
    """Mean seconds per training iteration of the epochs that train the student (after ``warmup_epochs``), from
    the run's ``metrics.jsonl`` (``train_seconds``, evaluation excluded); None without such epochs."""
    options = summary.get("options", {})
    warmup, iters = options.get("warmup_epochs"), summary.get("iters_per_epoch")
    if warmup is None or not iters:
        return None
    records = read_metrics(os.path.dirname(summary["summary_path"]))
    seconds = [r["train_seconds"] for r in records if r["epoch"] > warmup and "train_seconds" in r]
    return sum(seconds) / (len(seconds) * iters) if seconds else None


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def variants_markdown(summaries: list[dict], order=(), baseline: str = BASELINE_VARIANT) -> str:
    """One table of a plan's variants (``summary["variant"]``, set by tools/reproduce.py): a row per teacher and
    variant with the mean ± std over seeds of the final and the best top-1, each mean's difference from the
    ``baseline`` variant of the same teacher and bit-widths (whatever its activation quantizer), the final top-1 of
    each seed, the training iterations of a run (epochs x iterations per epoch), the mean seconds per iteration of
    the student's epochs (:func:`student_seconds_per_iteration`) and the mean wall time of a run. Rows of one teacher
    follow ``order`` (variant names; the others after them, by name). "" when no run has a variant."""
    groups = defaultdict(list)
    for s in summaries:
        if s.get("variant") and s.get("student_top1") is not None:
            groups[(s["dataset"], s["network"], _teacher_name(s), s["qw"], s["qa"], s["act_mode"]),
                   s["variant"]].append(s)
    if not groups:
        return ""
    values = {key: {m: [s[m] for s in runs if s.get(m) is not None] for m in METRICS} for key, runs in groups.items()}
    means = {key: {m: statistics.fmean(v) if v else None for m, v in by_metric.items()}
             for key, by_metric in values.items()}
    baselines = {row[:5]: means[row, variant] for row, variant in means if variant == baseline}
    header = ["model", "teacher weights", "bits", "variant", "final top-1", "Δ final", "best top-1", "Δ best",
              "final top-1 per seed", "iterations", "s/it (student epochs)", "minutes per run"]
    lines = ["Variants: mean ± sample standard deviation over seeds (n = seeds); Δ: difference of the means from "
             f"the `{baseline}` variant of the same teacher and bits; iterations: training iterations of a run "
             "(epochs x iterations per epoch); s/it: mean seconds per training iteration once the student trains "
             "(evaluation excluded); minutes per run: mean wall time of a run, evaluations included.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rank = {name: i for i, name in enumerate(order)}
    def position(item):
        (row, variant), _ = item
        return row[:5], rank.get(variant, len(rank)), variant

    for (row, variant), runs in sorted(groups.items(), key=position):
        dataset, network, teacher, qw, qa, act_mode = row
        deltas = []
        for m in METRICS:
            pair = baselines.get(row[:5], {}).get(m), means[row, variant][m]
            deltas.append("–" if variant == baseline or None in pair else _signed(pair[1] - pair[0]))
        runs = sorted(runs, key=lambda s: (s.get("id", 0), s["summary_path"]))
        speeds = [v for v in map(student_seconds_per_iteration, runs) if v is not None]
        iterations = sorted({s["epochs"] * s["iters_per_epoch"] for s in runs if s.get("iters_per_epoch")})
        minutes = [s["seconds"] / 60 for s in runs if s.get("seconds") is not None]
        lines.append("| " + " | ".join([
            f"{DATASET_NAMES.get(dataset, dataset)} `{network}`", f"`{teacher}`", f"{bits_label(qw, qa)} {act_mode}",
            variant, format_cell(values[row, variant]["student_top1"]), deltas[0],
            format_cell(values[row, variant]["best_top1"]) if values[row, variant]["best_top1"] else "–", deltas[1],
            ", ".join(f"{s['student_top1']:.2f}" for s in runs), ", ".join(map(str, iterations)) or "–",
            f"{statistics.fmean(speeds):.3f}" if speeds else "–",
            f"{statistics.fmean(minutes):.1f}" if minutes else "–"]) + " |")
    return "\n".join(lines) + "\n"
