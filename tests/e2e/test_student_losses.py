"""Whole runs with the student's loss terms and input filters: the defaults train the student of before, each part
runs on a real teacher, and what cannot run ends in an ``error:`` before a run directory exists."""

import json
import math
import os
import subprocess
import sys

import pytest

from ..conftest import CIFAR10_CONF, CIFAR10A_CONF, RESNET20A_WEIGHTS, ROOT, last_json, needs_shared_data, run_main

# The commit this work starts from (before student_losses existed): with the defaults, the code must train the
# student that commit trains, bit for bit. The test runs that commit's own code (git archive) on this machine,
# so the comparison holds on any CPU; where the history is missing it compares with the value recorded at that
# commit on an AMD EPYC CPU (2 cores, torch 2.14.1), which another CPU's rounding may change.
BASE_COMMIT = "a37b80c26ab9cee47adf58e8918cf36548de8566"
BASE_STUDENT_SHA256 = "9cba819d9a57383b"
DEFAULT_RUN = ("teacher_weights=random", "nEpochs=2", "iters_per_epoch=3", "batchSize=4", "warmup_epochs=1")


def short_run_args(tmp_path, data, conf, *sets, qw=3, qa=3):
    args = ["--conf_path", conf, "--id", "1", "--qw", str(qw), "--qa", str(qa)]
    for s in (f"save_path={tmp_path / 'runs'}", f"dataPath={data}", "nThreads=0", "test_batch_size=10",
              "granq_impl=eager", *sets):
        args += ["--set", s]
    return args


def short_run(tmp_path, data, conf, *sets, qw=3, qa=3):
    return run_main(short_run_args(tmp_path, data, conf, *sets, qw=qw, qa=qa))


def base_commit_sha256(tmp_path, data) -> str:
    """student_sha256 of the default short run with the code of BASE_COMMIT, or the recorded value."""
    tree = tmp_path / "base"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", ROOT, "archive", BASE_COMMIT], capture_output=True)
    if archive.returncode != 0:
        return BASE_STUDENT_SHA256
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    args = short_run_args(tmp_path / "base_runs", data, os.path.join(tree, "CIFAR", "cifar10_resnet20.hocon"),
                          *DEFAULT_RUN)
    done = subprocess.run([sys.executable, os.path.join(tree, "CIFAR", "main.py"), *args], capture_output=True,
                          text=True, cwd=tree)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])["student_sha256"][0]


def test_default_student_loss_trains_the_same_student_as_before(tmp_path, cifar_folder):
    code, lines = short_run(tmp_path, cifar_folder, CIFAR10_CONF, *DEFAULT_RUN)
    assert code == 0
    assert last_json(lines)["student_sha256"] == [base_commit_sha256(tmp_path, cifar_folder)]


TERMS = ("attention", "cam", "reliable_ce", "pseudo_label")
# part -> (overrides, the keys it adds to metrics.jsonl)
PARTS = {term: ([f"student_losses=[kd, {term}]"], [term]) for term in TERMS}
PARTS["lowpass"] = (["student_input_filter=lowpass"], ["lowpass_kept"])
PARTS["all"] = ([f"student_losses=[kd, {', '.join(TERMS)}]", "student_input_filter=lowpass"],
                [*TERMS, "lowpass_kept"])


@needs_shared_data
@pytest.mark.parametrize("part", PARTS)
def test_each_part_runs_on_the_option_a_teacher(tmp_path, cifar_folder, part):
    overrides, keys = PARTS[part]
    code, lines = short_run(tmp_path, cifar_folder, CIFAR10A_CONF, f"teacher_weights={RESNET20A_WEIGHTS}",
                            "nEpochs=1", "iters_per_epoch=3", "warmup_epochs=0", *overrides)
    assert code == 0
    with open(os.path.join(last_json(lines)["run_dir"], "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert all(math.isfinite(record[key]) for key in keys)
    terms = [key for key in keys if key in TERMS]
    assert record["loss_S"] == pytest.approx(record["kd"] + sum(record[key] for key in terms), rel=1e-4)


@pytest.mark.parametrize("network, term, what", [
    ("tests.e2e.user_models:tiny_net", "attention", "residual blocks"),
    ("tests.e2e.user_models:tiny_mlp", "cam", "runs no Conv2d with an output larger than 1 x 1"),
])
def test_a_term_the_network_cannot_run_fails_before_the_run_directory(tmp_path, cifar_folder, capsys, network,
                                                                      term, what):
    code, lines = short_run(tmp_path, cifar_folder, CIFAR10_CONF, f"network={network}", "teacher_weights=random",
                            f"student_losses=[kd, {term}]")
    err = capsys.readouterr().err
    assert code == 2 and lines == []
    assert f"error: student_losses: the '{term}' term cannot run on network '{network}': " in err and what in err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("override, message", [
    ("student_losses=[kd, focal]", "error: student_losses = ['kd', 'focal']: 'focal' is not a registered term; "
                                   "choose from: "),
    ("student_input_filter=blur", "error: student_input_filter = 'blur' is not valid; choose one of: none, lowpass"),
])
def test_unknown_terms_and_filters_fail_at_config_load(tmp_path, cifar_folder, capsys, override, message):
    code, _ = short_run(tmp_path, cifar_folder, CIFAR10_CONF, "teacher_weights=random", override)
    assert code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")
