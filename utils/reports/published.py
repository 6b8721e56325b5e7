"""Published top-1 numbers to compare with, kept as data in ``published_numbers.csv`` beside this file.

The CSV is a transcription of ``../shared/reference/paper_numbers.md``: the full-precision teachers as
printed in the papers, the earlier zero-shot methods from AdaDFQ's table, and GranQ's abstract claims
(its per-cell tables are published as images only). Edit the CSV, not this module, to add numbers.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass

__all__ = ["DATASET_NAMES", "EARLIER_METHODS", "NETWORK_MODELS", "PUBLISHED_CSV", "Published", "best_earlier",
           "bits_label", "granq_claim", "load_published", "methods_table", "paper_model", "published_index"]

PUBLISHED_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published_numbers.csv")

DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}
# Registry name -> the model name the papers use. resnet20a_cifar10 has option-A shortcuts, not the
# papers' pytorchcv ResNet-20; it is listed under the same name because depth and data are the same,
# and the results table shows the teacher's own accuracy beside the published one.
NETWORK_MODELS = {
    "resnet20_cifar10": "ResNet-20",
    "resnet20_cifar100": "ResNet-20",
    "resnet20a_cifar10": "ResNet-20",
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "mobilenetv2_w1": "MobileNetV2",
}
# Column order of AdaDFQ's table.
EARLIER_METHODS = ("ZAQ", "IntraQ", "ARC+AIT", "GDFQ", "ARC", "Qimera", "AdaSG", "AdaDFQ")
QUALIFIERS = {"": "", "rerun": "†", "approx": "≈", "above": ">"}


@dataclass(frozen=True)
class Published:
    dataset: str  # config spelling: cifar10, cifar100, imagenet
    model: str  # paper spelling: ResNet-20, ...
    bits: str  # W3A3, ..., or FP for the full-precision teacher
    method: str
    top1: float
    qualifier: str  # "", rerun, approx, above
    source: str

    def label(self) -> str:
        """The number as a paper would print it: ``75.11†``, ``≈58.21``, ``>93.89``."""
        mark = QUALIFIERS[self.qualifier]
        return f"{self.top1:.2f}{mark}" if self.qualifier == "rerun" else f"{mark}{self.top1:.2f}"


@functools.lru_cache(maxsize=None)
def load_published(path: str = PUBLISHED_CSV) -> tuple[Published, ...]:
    """All rows of the published-numbers CSV (``#`` lines are comments)."""
    with open(path, newline="") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        published = tuple(Published(r["dataset"], r["model"], r["bits"], r["method"], float(r["top1"]),
                                    r["qualifier"], r["source"]) for r in rows)
    unknown = {p.qualifier for p in published} - QUALIFIERS.keys()
    if unknown:
        raise ValueError(f"{path}: unknown qualifier(s) {sorted(unknown)}; use one of {sorted(QUALIFIERS)}")
    return published


def paper_model(network: str) -> str:
    """The papers' name of a registry network; the registry name itself when the papers do not use it."""
    return NETWORK_MODELS.get(network, network)


def bits_label(qw: int, qa: int) -> str:
    """``W3A3`` style label of a bit-width pair.

    >>> bits_label(4, 8)
    'W4A8'
    """
    return f"W{qw}A{qa}"


def published_index() -> dict[tuple[str, str, str], list[Published]]:
    """The published rows grouped by (dataset, model, bits), in the CSV's order."""
    index: dict[tuple[str, str, str], list[Published]] = {}
    for p in load_published():
        index.setdefault((p.dataset, p.model, p.bits), []).append(p)
    return index


def best_earlier(rows) -> str:
    """The best earlier method of ``rows`` (one cell) as ``AdaDFQ 84.89``; tied methods are all named;
    ``–`` when none is published."""
    earlier = [p for p in rows if p.method in EARLIER_METHODS]
    if not earlier:
        return "–"
    best = max(p.top1 for p in earlier)
    winners = [p for p in earlier if p.top1 == best]
    return f"{', '.join(p.method for p in winners)} {winners[0].label()}"


def granq_claim(rows) -> str:
    """GranQ's published number for ``rows`` (one cell), ``–`` when there is none."""
    return "; ".join(p.label() for p in rows if p.method == "GranQ") or "–"


def methods_table(keys, heading: str = "Published top-1 (%)") -> list[str]:
    """Markdown lines: every published number (each earlier method, then GranQ) of the cells ``keys``,
    (dataset, model, bits) triples in the order given; cells with no number are left out."""
    index = published_index()
    methods = list(EARLIER_METHODS) + ["GranQ"]
    lines = [f"### {heading}", "",
             "| dataset | model | bits | " + " | ".join(methods) + " |", "|" + "---|" * (3 + len(methods))]
    for dataset, model, bits in keys:
        by_method = {p.method: p.label() for p in index.get((dataset, model, bits), [])}
        if not by_method:
            continue
        lines.append(f"| {DATASET_NAMES.get(dataset, dataset)} | {model} | {bits} | "
                     + " | ".join(by_method.get(m, "–") for m in methods) + " |")
    return lines + ["", "† re-run by AdaDFQ with the authors' code; ≈ about; > above (the paper states a lower "
                        "bound); – not reported. GranQ: its abstract (per-cell tables are images only). Source: "
                        "`utils/reports/published_numbers.csv`."]
