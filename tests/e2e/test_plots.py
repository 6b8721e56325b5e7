import json
import os
import subprocess
import sys

from matplotlib.image import imread
from PIL import Image

from utils.reports.plots import ACCURACY_PNG, LOSSES_PNG, _series, plot_run

from ..conftest import ROOT, last_json, run_main, tiny_run_args

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300
    pixels = imread(path)
    assert pixels.std() > 0  # something was drawn


def test_short_run_leaves_valid_pngs(tmp_path, cifar_folder):
    # eval_every=2: the first of the two epochs is not evaluated and has no student accuracy.
    code, lines = run_main(tiny_run_args(tmp_path, cifar_folder, "--set", "nEpochs=2", "--set", "eval_every=2"))
    assert code == 0
    run_dir = last_json(lines)["run_dir"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert ["student_top1" in json.loads(line) for line in f] == [False, True]
    paths = plot_run(run_dir)
    assert paths == [os.path.join(run_dir, ACCURACY_PNG), os.path.join(run_dir, LOSSES_PNG)]
    for path in paths:
        _check_png(path)


def test_unevaluated_epochs_have_no_accuracy_point():
    records = [{"epoch": 1, "student_top1": None}, {"epoch": 2}, {"epoch": 3, "student_top1": 40.0},
               {"epoch": 4, "student_top1": 45.5}]
    assert _series(records, "student_top1") == ([3, 4], [40.0, 45.5])
    assert _series([{"epoch": 1, "teacher_acc": 0.25}], "teacher_acc", scale=100.0) == ([1], [25.0])


def test_metrics_without_any_evaluation_still_plot(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 1, "loss_G": 1.0, "loss_S": -0.5, "lr_S": 1e-4, "lr_G": 1e-3}) + "\n")
    for path in plot_run(str(tmp_path)):
        _check_png(path)


def test_run_without_epochs_has_no_plots(tmp_path):
    assert plot_run(str(tmp_path)) == []
    assert os.listdir(tmp_path) == []



def test_command_line_redraws_runs(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 1, "loss_G": 1.0, "student_top1": 12.5}) + "\n")
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(tmp_path),
                             str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nothing to plot" in result.stderr
    assert result.stdout.split() == [str(tmp_path / ACCURACY_PNG), str(tmp_path / LOSSES_PNG)]
    _check_png(tmp_path / ACCURACY_PNG)
