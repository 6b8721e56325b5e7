"""Run directories written before ``utils/`` was split into sub-packages still resume and evaluate.

The run is written by the code of the commit before the move (``git archive``), on this machine. Checkpoints hold
plain Python values and tensors (no pickled classes of this project), so the new layout reads them unchanged.
"""

import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT, last_json, run_main, tiny_run_args

# the module's run is made once, in one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("old_runs")

BEFORE_THE_MOVE = "ff6a51da281f8a3a6e5297366e18ea937e214c10"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, cifar_folder) -> dict:
    """The summary of a one-epoch run made by the code before the move."""
    tmp = tmp_path_factory.mktemp("old")
    archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE_THE_MOVE], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the commit before the move is not in this clone's history ({archive.stderr.decode()[:200]})")
    tree = tmp / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    args = tiny_run_args(tmp / "runs", cifar_folder, "--set", "iters_per_epoch=3",
                         conf=os.path.join(tree, "CIFAR", "cifar10_resnet20.hocon"))
    done = subprocess.run([sys.executable, os.path.join(tree, "CIFAR", "main.py"), *args], capture_output=True,
                          text=True, cwd=tree, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_run_from_before_the_move_evaluates_to_its_recorded_accuracy(old_run):
    for target in (old_run["run_dir"], os.path.join(old_run["run_dir"], "best_student.pt")):
        code, lines = run_main(["--eval", target])
        assert code == 0
        assert last_json(lines)["student_top1"] == old_run["student_top1"]


def test_a_run_from_before_the_move_resumes(old_run):
    # One more epoch than it was written with (--force lets nEpochs change): the checkpoint's student, generator,
    # optimizers and random states are all read by the new code and training goes on from them.
    code, lines = run_main(["--resume", old_run["run_dir"], "--force", "--set", "nEpochs=2"])
    assert code == 0
    summary = last_json(lines)
    assert summary["run_dir"] == old_run["run_dir"] and summary["epochs"] == 2
    with open(os.path.join(old_run["run_dir"], "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
