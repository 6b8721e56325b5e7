import doctest
import json
import os
import re
import subprocess
import sys

import pytest

import utils.reports.published
import utils.reports.results
from utils.reports.published import load_published
from utils.reports.results import find_summaries, load_summaries, results_markdown
from utils.system.errors import UserError

from ..conftest import ROOT

PAPER_NUMBERS = os.path.join(os.path.dirname(ROOT), "shared", "reference", "paper_numbers.md")
TOOL = os.path.join(ROOT, "tools", "results_table.py")


def _summary(folder, **values):
    summary = {"dataset": "cifar10", "network": "resnet20_cifar10", "qw": 3, "qa": 3, "act_mode": "granq",
               "weight_granularity": "kernel", "epochs": 200, "iters_per_epoch": 200, "teacher_top1": 94.03,
               "teacher_weights": "/cache/resnet20_cifar10-0597.pth", "student_top1": 80.0, "best_top1": 81.0,
               **values}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)


@pytest.fixture
def runs(tmp_path):
    # Three seeds of CIFAR-10 W3A3, nested at different depths; one CIFAR-100 W4A4 run; one layer-wise run.
    _summary(tmp_path / "a", student_top1=83.0, best_top1=84.0)
    _summary(tmp_path / "b", student_top1=85.5, best_top1=86.0)
    _summary(tmp_path / "b" / "c", student_top1=84.0, best_top1=85.0)
    _summary(tmp_path / "d", dataset="cifar100", network="resnet20_cifar100", qw=4, qa=4, student_top1=60.0,
             teacher_top1=70.36, teacher_weights="/cache/resnet20_cifar100-2964.pth")
    _summary(tmp_path / "e", act_mode="layerwise", student_top1=70.0)
    return tmp_path


def _row(text, start):
    """The cells of the first table line of ``text`` that starts with ``start``."""
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_cell_is_mean_and_std_over_seeds(runs):
    text = results_markdown(load_summaries([str(runs)]))
    granq = text[text.index("act_mode = granq"):text.index("act_mode = layerwise")]
    row = _row(granq, "| CIFAR-10 |")
    header = _row(granq, "| dataset |")
    # mean of 83.0, 85.5, 84.0 = 84.1667; sample std = sqrt(((-7/6)^2 + (4/3)^2 + (-1/6)^2) / 2) = 1.2583
    assert row[header.index("W3A3")] == "84.17 ± 1.26 (n=3)"
    assert row[header.index("paper W3A3")] == "AdaDFQ 84.89"
    assert row[header.index("W4A4")] == "–" and row[header.index("paper W5A5")] == "AdaDFQ 93.81; GranQ >93.89"
    assert row[header.index("FP top-1: ours (paper)")] == "94.03 (93.89)"
    cifar100 = _row(granq, "| CIFAR-100 |")
    assert cifar100[header.index("W4A4")] == "60.00 (n=1)"
    assert cifar100[header.index("paper W3A3")] == "AdaSG 52.76; GranQ ≈58.21"


def test_settings_are_separate_tables_with_granularity_stated(runs):
    text = results_markdown(load_summaries([str(runs)]))
    headings = re.findall(r"^### act_mode.*$", text, flags=re.M)
    assert headings == ["### act_mode = granq, weight_granularity = kernel, 200 epochs x 200 iterations",
                        "### act_mode = layerwise, weight_granularity = kernel, 200 epochs x 200 iterations"]
    layerwise = text[text.index("act_mode = layerwise"):]
    assert "70.00 (n=1)" in _row(layerwise, "| CIFAR-10 |")
    assert "one range per (out, in) kernel" in text
    assert "| CIFAR-100 | ResNet-20 | W3A3 | – | 48.25 | 41.34† | 47.61† | 40.15† | 46.13† | 52.76 | 52.74 | ≈58.21 |" \
        in text


def test_best_metric_and_other_bit_widths(runs):
    _summary(runs / "f", qw=4, qa=8, best_top1=88.0)
    text = results_markdown(load_summaries([str(runs)]), metric="best_top1")
    header = _row(text, "| dataset |")
    assert header[4:] == ["W3A3", "paper W3A3", "W4A4", "paper W4A4", "W4A8", "paper W4A8", "W5A5", "paper W5A5"]
    row = _row(text, "| CIFAR-10 |")
    assert row[header.index("W3A3")] == "85.00 ± 1.00 (n=3)"
    assert row[header.index("W4A8")] == "88.00 (n=1)" and row[header.index("paper W4A8")] == "–"


def test_runs_of_different_teachers_or_lengths_are_not_averaged(tmp_path):
    _summary(tmp_path / "a", student_top1=80.0)
    _summary(tmp_path / "b", student_top1=90.0, teacher_weights="random")
    _summary(tmp_path / "c", student_top1=70.0, epochs=2)
    text = results_markdown(load_summaries([str(tmp_path)]))
    assert text.count("80.00 (n=1)") == text.count("90.00 (n=1)") == text.count("70.00 (n=1)") == 1
    assert "2 epochs x 200 iterations" in text


def _config(folder, **values):
    options = {"save_path": str(folder), "experimentID": "x", "nThreads": 8, "lr_S": 0.0001,
               "lrPolicy_S": "multi_step", "step_S": [100, 200, 300], **values}
    (folder / "config.hocon").write_text("".join(f"{key} = {json.dumps(v)}\n" for key, v in options.items()))


def test_runs_that_differ_in_an_option_are_separate_tables(tmp_path):
    for name, top1 in (("a", 80.0), ("b", 82.0), ("c", 70.0), ("d", 60.0)):
        _summary(tmp_path / name, student_top1=top1)
    _config(tmp_path / "a", lrPolicy_S="cosine", nThreads=1, experimentID="y")
    _config(tmp_path / "b", lrPolicy_S="cosine")  # a seed of "a": place, name and threads do not count
    _config(tmp_path / "c")
    _config(tmp_path / "d", step_S=[50])
    _summary(tmp_path / "e", dataset="cifar100", network="resnet20_cifar100", student_top1=50.0)
    _config(tmp_path / "e", lr_S=0.001)  # alone in its cell: nothing to tell apart
    _summary(tmp_path / "f", dataset="cifar100", network="resnet20_cifar100", student_top1=52.0)  # no config
    text = results_markdown(load_summaries([str(tmp_path)]))
    headings = re.findall(r"^### act_mode.*$", text, flags=re.M)
    prefix = "### act_mode = granq, weight_granularity = kernel, 200 epochs x 200 iterations, "
    assert headings == [prefix + "lrPolicy_S = ?, step_S = ?",  # "f": its options are unknown
                        prefix + "lrPolicy_S = cosine, step_S = [100, 200, 300]",
                        prefix + "lrPolicy_S = multi_step, step_S = [100, 200, 300]",
                        prefix + "lrPolicy_S = multi_step, step_S = [50]"]
    tables = text.split("### ")[1:]
    assert "52.00 (n=1)" in tables[0] and "CIFAR-10 |" not in tables[0]
    assert "81.00 ± 1.41 (n=2)" in tables[1] and "CIFAR-100" not in tables[1]
    assert "70.00 (n=1)" in tables[2] and "50.00 (n=1)" in tables[2]  # lr_S differs, but not within a cell
    assert "60.00 (n=1)" in tables[3]


def test_each_summary_counts_once(runs):
    assert len(find_summaries([str(runs), str(runs / "a"), str(runs / "a" / "summary.json")])) == 5
    with pytest.raises(UserError, match="does not exist"):
        find_summaries([str(runs / "missing")])


def test_command_line(runs, tmp_path):
    output = tmp_path / "table.md"
    result = subprocess.run([sys.executable, TOOL, str(runs / "a"), str(runs / "b"), "--output", str(output)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "84.17 ± 1.26 (n=3)" in result.stdout and output.read_text() == result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, TOOL, str(empty)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no summary.json under" in result.stderr


@pytest.mark.skipif(not os.path.isfile(PAPER_NUMBERS), reason="../shared/reference/paper_numbers.md is absent")
def test_published_numbers_match_the_reference():
    with open(PAPER_NUMBERS) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| dataset | model | bits | ZAQ"))
    methods = [c.strip() for c in lines[start].strip("|").split("|")][3:]
    names = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "ImageNet": "imagenet"}
    expected = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        dataset, model, bits, *cells = [c.strip() for c in line.strip("|").split("|")]
        for method, cell in zip(methods, cells):
            if cell != "–":
                expected[names[dataset], model, bits, method] = cell
    published = {(p.dataset, p.model, p.bits, p.method): p.label() for p in load_published()
                 if p.method in methods}
    assert published == expected
    fp = {(p.dataset, p.model): p.top1 for p in load_published() if p.method == "FP"}
    assert fp == {("cifar10", "ResNet-20"): 93.89, ("cifar100", "ResNet-20"): 70.33, ("imagenet", "ResNet-18"): 71.47,
                  ("imagenet", "MobileNetV2"): 73.03, ("imagenet", "ResNet-50"): 77.73}


@pytest.mark.parametrize("module", [utils.reports.results, utils.reports.published])
def test_doctests(module):
    # utils/ is not among pytest's doctest paths; these examples are part of the documentation.
    assert doctest.testmod(module).failed == 0


def _variant_run(folder, variant, seed, final, best, train_seconds, **values):
    """A finished run of a plan's ``variant``: summary.json, config.hocon (2 warm-up epochs) and metrics.jsonl
    (4 epochs of 10 iterations, ``train_seconds`` each)."""
    _summary(folder, **{"id": seed, "student_top1": final, "best_top1": best, "iters_per_epoch": 10, "epochs": 4,
                        **values})
    (folder / "config.hocon").write_text("warmup_epochs = 2\n")
    with open(folder / "metrics.jsonl", "w") as f:
        for epoch, seconds in enumerate(train_seconds, start=1):
            f.write(json.dumps({"epoch": epoch, "train_seconds": seconds}) + "\n")
    return folder


def test_variants_table_compares_each_variant_with_the_baseline(tmp_path):
    folders = [
        _variant_run(tmp_path / "b1", "baseline", 1, 80.0, 81.0, [1, 1, 3, 5]),
        _variant_run(tmp_path / "b2", "baseline", 2, 82.0, 82.0, [1, 1, 3, 5]),
        _variant_run(tmp_path / "x2", "cam", 2, 83.0, 84.0, [1, 1, 6, 6]),
        _variant_run(tmp_path / "x1", "cam", 1, 81.5, 83.0, [1, 1, 6, 6]),
        _variant_run(tmp_path / "other", "baseline", 1, 90.0, 90.0, [1, 1, 1, 1], teacher_weights="/w/other.pth"),
    ]
    variants = {"b1": "baseline", "b2": "baseline", "x1": "cam", "x2": "cam", "other": "baseline"}
    summaries = load_summaries([str(f) for f in folders])
    for s in summaries:
        s["variant"] = variants[os.path.basename(os.path.dirname(s["summary_path"]))]
    text = utils.reports.results.variants_markdown(summaries, order=["baseline", "cam"])
    header = _row(text, "| model |")
    rows = [line for line in text.splitlines() if line.startswith("| CIFAR-10 ")]
    # By teacher (file name), then in the given order of the variants.
    assert [_row(line, "|")[header.index("variant")] for line in rows] == ["baseline", "baseline", "cam"]
    other, baseline, cam = (dict(zip(header, _row(line, "|"))) for line in rows)
    assert baseline["final top-1"] == "81.00 ± 1.41 (n=2)" and baseline["Δ final"] == "–"
    assert cam["final top-1"] == "82.25 ± 1.06 (n=2)" and cam["Δ final"] == "+1.25"
    assert cam["best top-1"] == "83.50 ± 0.71 (n=2)" and cam["Δ best"] == "+2.00"
    assert cam["final top-1 per seed"] == "81.50, 83.00"  # in seed order
    # Epochs 3 and 4 train the student: (3 + 5) / 20 and (6 + 6) / 20 seconds per iteration.
    assert baseline["s/it (student epochs)"] == "0.400" and cam["s/it (student epochs)"] == "0.600"
    assert other["teacher weights"] == "`other.pth`" and other["final top-1"] == "90.00 (n=1)"
    assert baseline["iterations"] == "40" and baseline["minutes per run"] == "–"  # 4 epochs of 10; no seconds
    assert utils.reports.results.variants_markdown(load_summaries([str(folders[0])])) == ""  # no variant: no table


def test_variants_table_compares_with_the_named_baseline_whatever_its_quantizer(tmp_path):
    folders = [_variant_run(tmp_path / "g", "granq", 1, 80.0, 81.0, [1, 1, 3, 5], seconds=300.0),
               _variant_run(tmp_path / "l", "adadfq", 1, 78.0, 79.0, [1, 1, 2, 2], act_mode="layerwise",
                            seconds=240.0, iters_per_epoch=20)]
    summaries = load_summaries([str(f) for f in folders])
    for s, variant in zip(summaries, ("granq", "adadfq")):
        s["variant"] = variant
    text = utils.reports.results.variants_markdown(summaries, order=["granq", "adadfq"], baseline="granq")
    header = _row(text, "| model |")
    granq, adadfq = (dict(zip(header, _row(line, "|"))) for line in text.splitlines() if line.startswith("| CIFAR"))
    assert (granq["variant"], granq["bits"], granq["Δ final"]) == ("granq", "W3A3 granq", "–")
    assert (adadfq["bits"], adadfq["Δ final"], adadfq["Δ best"]) == ("W3A3 layerwise", "-2.00", "-2.00")
    assert (granq["iterations"], granq["minutes per run"]) == ("40", "5.0")
    assert (adadfq["iterations"], adadfq["minutes per run"]) == ("80", "4.0")
