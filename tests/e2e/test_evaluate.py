import os

import pytest
import torch

from checks.cli_eval import labelled_test_set
from utils.runs.saved import evaluate_saved
from utils.system.errors import UserError

from ..conftest import last_json, make_image_folder, run_main, tiny_run_args

# the module's run is made once, in one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("evaluate")


def _teacher_labelled_run(root):
    """A finished W6A6 run whose test labels are its teacher's predictions.

    A random teacher predicts one class for every image and so would make any student score the same.
    This teacher's BatchNorm statistics are those of the test images and its last layer is centred and
    scaled on them, so its predictions vary; the labels are its own predictions (teacher top-1 100%), and
    at 6 bits the student agrees with it on part of the images only, so its accuracy depends on its weights
    and bit-widths. The GPU check makes the same test set (checks/cli_eval.py).
    """
    test_set, weights = labelled_test_set(root, 40)
    labels = [c for c in os.listdir(test_set) if os.listdir(os.path.join(test_set, c))]
    args = tiny_run_args(os.path.join(root, "runs"), test_set, "--qw", "6", "--qa", "6",
                         "--set", f"teacher_weights={weights}", "--set", "nEpochs=2",
                         # a small step: the student trains, yet stays near its teacher
                         "--set", "lr_S=1e-7",
                         # the saved student must repeat the run's accuracy exactly, on CUDA too
                         "--set", "deterministic=true")
    code, lines = run_main(args)
    assert code == 0
    return last_json(lines), len(labels)



@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    return _teacher_labelled_run(str(tmp_path_factory.mktemp("labelled")))


def test_the_run_is_a_meaningful_check(labelled_run):
    summary, classes = labelled_run
    assert classes >= 5 and summary["teacher_top1"] == 100.0
    assert 0 < summary["student_top1"] < 100


def test_saved_student_reproduces_the_recorded_accuracy(labelled_run):
    summary, _ = labelled_run
    result = evaluate_saved(summary["run_dir"], device="cpu")
    assert result["student_top1"] == summary["student_top1"]
    assert result["student_top5"] == summary["student_top5"]
    assert result["recorded_top1"] == summary["student_top1"]
    assert result["checkpoint"] == os.path.join(summary["run_dir"], "checkpoint.pt")
    assert (result["network"], result["qw"], result["qa"], result["act_mode"], result["weight_granularity"],
            result["epoch"], result["seed"]) == ("resnet20_cifar10", 6, 6, "granq", "kernel", 2, summary["seed"])


def test_best_student_reproduces_the_best_accuracy(labelled_run):
    summary, _ = labelled_run
    result = evaluate_saved(os.path.join(summary["run_dir"], "best_student.pt"), overrides=["test_batch_size=7"])
    assert result["student_top1"] == result["recorded_top1"] == summary["best_top1"]


def test_data_path_and_overrides(labelled_run, tmp_path):
    summary, _ = labelled_run
    with pytest.raises(UserError, match="cannot change a saved student"):
        evaluate_saved(summary["run_dir"], overrides=["qa=4"])
    with pytest.raises(UserError, match="unknown config key"):
        evaluate_saved(summary["run_dir"], overrides=["no_such_key=1"])
    three_classes = make_image_folder(tmp_path / "three", classes=3, per_class=1, size=32)
    with pytest.raises(UserError, match="has 3 class folders but nClasses = 10"):
        evaluate_saved(summary["run_dir"], data_path=three_classes)
    with pytest.raises(UserError, match="neither a checkpoint file nor a run directory"):
        evaluate_saved(str(tmp_path / "missing"))


def test_the_check_can_fail(labelled_run, tmp_path):
    # The same weights rebuilt with other activation bits must not reproduce the recorded accuracy,
    # or the reproduction above would prove nothing.
    summary, _ = labelled_run
    checkpoint = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=False)
    checkpoint["options"]["qa"] = 5
    torch.save(checkpoint, tmp_path / "other_bits.pt")
    assert evaluate_saved(str(tmp_path / "other_bits.pt"))["student_top1"] != summary["student_top1"]
