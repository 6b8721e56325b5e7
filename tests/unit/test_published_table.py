import csv
import json
import os
import re

import pytest

from ..conftest import ROOT

README = os.path.join(ROOT, "README.md")
CSV = os.path.join(ROOT, "utils", "reports", "published_numbers.csv")
START, END = "<!-- published-table:start -->", "<!-- published-table:end -->"


@pytest.fixture(scope="module")
def tool():
    from utils.runs import published_table_cli

    return published_table_cli


def _tool_output(tool, capsys, *argv) -> str:
    assert tool.main(list(argv)) == 0
    return capsys.readouterr().out


def _rows(text):
    """Table body rows of ``text`` (header and separator dropped), each as a list of cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


def test_readme_holds_the_tools_table(tool, capsys):
    with open(README) as f:
        readme = f.read()
    assert readme.count(START) == 1 and readme.count(END) == 1, "README.md needs the published-table markers"
    between = readme[readme.index(START) + len(START):readme.index(END)].strip("\n") + "\n"
    assert between == _tool_output(tool, capsys), \
        "README.md's reproduce table differs from the tool: paste the output of python tools/published_table.py"


def test_fifteen_cells_with_the_csvs_numbers(tool, capsys):
    # Read the CSV here without utils.reports.published, so a fault in the loader shows.
    with open(CSV, newline="") as f:
        records = list(csv.DictReader(line for line in f if not line.startswith("#")))
    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}
    earlier = {}
    granq = {}
    for r in records:
        key = (names[r["dataset"]], r["model"], r["bits"])
        if r["method"] == "GranQ":
            granq[key] = r["top1"]
        elif r["method"] != "FP":
            earlier.setdefault(key, []).append((float(r["top1"]), r["method"], r["top1"]))
    rows = _rows(_tool_output(tool, capsys))
    assert len(rows) == 15 == len(earlier)
    seen = set()
    for dataset, model, bits, command, best, claim, ours in rows:
        key = (dataset, model.split(" (")[0], bits)
        seen.add(key)
        top = max(earlier[key])[0]
        methods = [m for value, m, _ in earlier[key] if value == top]
        assert best == f"{', '.join(methods)} {max(earlier[key])[2]}", key
        assert (re.sub(r"^[≈>]", "", claim) if claim != "–" else None) == granq.get(key), key
        assert ours == "not run yet"
    assert seen == set(earlier)
    assert {k for k in granq} <= seen


def test_each_command_runs_its_cells_config_and_bits(tool):
    for dataset, model, bits in tool.cells():
        path = os.path.join(ROOT, tool.script(dataset, model, bits))
        with open(path) as f:
            text = f.read()
        config = os.path.basename(tool.config_path(dataset, model))[:-len(".hocon")]
        assert re.search(rf'run\.sh" {config} {bits[1]} "\$@"', text), (path, config, bits)


def _summary(folder, **values):
    summary = {"dataset": "cifar100", "network": "resnet20_cifar100", "qw": 3, "qa": 3, "act_mode": "granq",
               "weight_granularity": "kernel", "epochs": 200, "iters_per_epoch": 200, "student_top1": 57.0,
               "teacher_weights": "/cache/resnet20_cifar100-2964.pth", **values}
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_ours_counts_only_full_granq_runs(tool, capsys, tmp_path):
    _summary(tmp_path / "a", student_top1=57.0)
    _summary(tmp_path / "b", student_top1=59.0)
    _summary(tmp_path / "short", epochs=2, student_top1=10.0)
    _summary(tmp_path / "random", teacher_weights="random", student_top1=11.0)
    _summary(tmp_path / "layerwise", act_mode="layerwise", student_top1=12.0)
    rows = _rows(_tool_output(tool, capsys, "--results", str(tmp_path)))
    ours = {(r[0], r[2]): r[6] for r in rows}
    assert ours["CIFAR-100", "W3A3"] == "58.00 ± 1.41 (n=2)"
    assert sum(cell != "not run yet" for cell in ours.values()) == 1
