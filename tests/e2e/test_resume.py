import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import utils.training.losses.generator as generator_losses
import utils.training.trainer as trainer_module

from ..conftest import ROOT, last_json, run_main, tiny_run_args

ACCURACY_KEYS = ("teacher_top1", "teacher_top5", "student_top1", "student_top5", "best_top1", "best_top5", "epochs")


# Runs compared with each other are deterministic, so that the comparisons also hold on CUDA.
DETERMINISTIC = ("--set", "deterministic=true")


def resumable_args(save_path, data_path, *extra):
    return tiny_run_args(save_path, data_path, "--set", "nEpochs=3", "--set", "iters_per_epoch=5",
                         "--set", "batchSize=24", "--set", "log_interval=1", *DETERMINISTIC, *extra)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


WITH_WORKERS = ("--set", "nThreads=2", "--set", "eval_cache=off")


def wait_for(path, text: str, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(path) and text in open(path).read():
            return
        time.sleep(0.01)
    raise AssertionError(f"{text!r} never appeared in {path} (exit code {process.poll()})")


@pytest.fixture(scope="module")
def straight_with_workers(tmp_path_factory, cifar_folder):
    """An uninterrupted run with 2 evaluation workers, the CPU's share of the CIFAR default (8), decoding the test
    images at every evaluation (no cache), so that the workers live through the whole run."""
    save_path = tmp_path_factory.mktemp("straight")
    code, lines = run_main(resumable_args(save_path, cifar_folder, *WITH_WORKERS))
    assert code == 0
    return last_json(lines)


@pytest.mark.parametrize("signum, phase", [(signal.SIGTERM, "training"), (signal.SIGTERM, "evaluating"),
                                           (signal.SIGINT, "evaluating")])
def test_a_signal_to_the_process_group_checkpoints_and_resumes_to_the_same_student(
        tmp_path, cifar_folder, straight_with_workers, signum, phase):
    """As SLURM (SIGTERM) or a terminal (SIGINT) signals a whole process group, loader workers included."""
    save_path = tmp_path / "interrupted"
    err_path = tmp_path / "stderr.txt"
    command = [sys.executable, os.path.join(ROOT, "tests", "e2e", "slow_main.py"),
               *resumable_args(save_path, cifar_folder, *WITH_WORKERS)]
    with open(err_path, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        wait_for(err_path, f"slow_main: {phase} epoch 2", process)
        os.killpg(process.pid, signum)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # a failed wait: leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    err = err_path.read_text()
    assert process.returncode == 128 + signum, err
    assert out == "" and "Traceback" not in err
    (run_dir,) = [os.path.join(save_path, d) for d in os.listdir(save_path)]
    assert f"{signal.Signals(signum).name} received" in err
    assert f"--resume {run_dir}" in err
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert (checkpoint["epoch"], checkpoint["iteration"]) < (3, 0)

    code, lines = run_main(["--resume", run_dir])
    assert code == 0
    resumed = last_json(lines)
    assert resumed["run_dir"] == run_dir
    assert resumed["student_sha256"] == straight_with_workers["student_sha256"]
    assert {k: resumed[k] for k in ACCURACY_KEYS} == {k: straight_with_workers[k] for k in ACCURACY_KEYS}
    assert without_timings(metrics(run_dir)) == without_timings(metrics(straight_with_workers["run_dir"]))
    with open(os.path.join(run_dir, "train.log")) as f:
        assert "resumed at epoch" in f.read()


@pytest.mark.parametrize("changes", [("eval_every=3",), ("nThreads=2",), ("nThreads=2", "eval_every=3"),
                                     ("eval_cache=auto",)],
                         ids=lambda changes: ",".join(changes))
def test_evaluation_settings_do_not_change_the_trained_student(tmp_path, cifar_folder, straight_with_workers,
                                                                changes):
    """The training noise has its own stream: when and with how many workers the run evaluates cannot move it."""
    base = ("eval_cache=off", "nThreads=0", "eval_every=1")
    sets = [arg for text in (*base, *changes) for arg in ("--set", text)]
    code, lines = run_main(resumable_args(tmp_path / "base", cifar_folder, *sets[:6]))
    assert code == 0
    code, changed = run_main(resumable_args(tmp_path / "changed", cifar_folder, *sets))
    assert code == 0
    assert last_json(changed)["student_sha256"] == last_json(lines)["student_sha256"]
    assert last_json(lines)["student_sha256"] == straight_with_workers["student_sha256"]


# A run on a pool of synthetic images (16 images, two synthesis steps each), which draws its batches and crops from
# the training noise instead of feeding a generator.
ON_A_POOL = ("image_source=pool", "pool_size=16", "pool_batch=8", "pool_iters=2")


@pytest.mark.parametrize("images", [(), ON_A_POOL], ids=["generator", "pool"])
def test_mid_epoch_stop_then_resume_is_bit_identical(tmp_path, cifar_folder, monkeypatch, images):
    """A stop requested in-process at iteration 2 of epoch 2 (no signal, no race), then --resume."""
    extra = [part for s in (*images, f"pool_cache={tmp_path / 'pools'}") for part in ("--set", s)]
    code, lines = run_main(resumable_args(tmp_path / "straight", cifar_folder, *extra))
    assert code == 0
    straight_dir = last_json(lines)["run_dir"]
    straight = torch.load(os.path.join(straight_dir, "checkpoint.pt"), weights_only=False)

    real_step, calls = trainer_module.Trainer.step, []

    def step_then_stop(self, *args, **kwargs):
        values = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5 + 2:  # 5 iterations per epoch: iteration 2 of epoch 2
            self.stop.request(signal.SIGTERM)
        return values

    monkeypatch.setattr(trainer_module.Trainer, "step", step_then_stop)
    code, lines = run_main(resumable_args(tmp_path / "stopped", cifar_folder, *extra))
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM and lines == []
    (run_dir,) = [os.path.join(tmp_path, "stopped", d) for d in os.listdir(tmp_path / "stopped")]
    stopped = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert (stopped["epoch"], stopped["iteration"]) == (1, 2)

    code, lines = run_main(["--resume", run_dir])
    assert code == 0
    resumed = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ("generator" not in resumed) == ("generator" not in straight) == bool(images)
    for network in ("student", "generator") if not images else ("student",):
        assert resumed[network].keys() == straight[network].keys()
        for key, value in straight[network].items():
            assert torch.equal(resumed[network][key], value), (network, key)
    assert without_timings(metrics(run_dir)) == without_timings(metrics(straight_dir))


def test_same_id_gives_the_same_summary(tmp_path, cifar_folder):
    first = last_json(run_main(tiny_run_args(tmp_path / "a", cifar_folder, "--set", "nEpochs=2", *DETERMINISTIC))[1])
    second = last_json(run_main(tiny_run_args(tmp_path / "b", cifar_folder, "--set", "nEpochs=2", *DETERMINISTIC))[1])
    assert first["deterministic"] and second["deterministic"]
    assert {k: first[k] for k in ACCURACY_KEYS} == {k: second[k] for k in ACCURACY_KEYS}
    assert without_timings(metrics(first["run_dir"])) == without_timings(metrics(second["run_dir"]))


def test_resume_refuses_a_different_config_unless_forced(tmp_path, cifar_folder, capsys):
    run_dir = last_json(run_main(tiny_run_args(tmp_path, cifar_folder, "--set", "nEpochs=1"))[1])["run_dir"]
    longer = tiny_run_args(tmp_path, cifar_folder, "--set", "nEpochs=2")
    code, _ = run_main(["--resume", run_dir, *longer])
    assert code == 2
    assert "error: --resume: nEpochs cannot change in a resumed run (nEpochs: 1 -> 2)" in capsys.readouterr().err
    code, lines = run_main(["--resume", run_dir, "--force", *longer])
    assert code == 0 and last_json(lines)["epochs"] == 2
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2]


def test_non_finite_loss_stops_with_its_name_and_keeps_the_checkpoint(tmp_path, cifar_folder, monkeypatch, capsys):
    real = generator_losses.marginal_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) == 7 else value  # epoch 2, iteration 2

    monkeypatch.setattr(generator_losses, "marginal_loss", poisoned)
    code, lines = run_main(resumable_args(tmp_path, cifar_folder))
    assert code == 2 and lines == []
    err = capsys.readouterr().err
    assert "error: loss marginal became nan at epoch 2, iteration 2; stopped." in err
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (1, 0)



def test_resume_applies_evaluation_overrides_and_refuses_the_others(tmp_path, cifar_folder, capsys):
    run_dir = last_json(run_main(tiny_run_args(tmp_path, cifar_folder))[1])["run_dir"]
    capsys.readouterr()
    for refused in (["--set", "qw=2"], ["--qw", "2"]):
        code, lines = run_main(["--resume", run_dir, *refused])
        err = capsys.readouterr().err
        assert code == 2 and lines == []
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            "error: --resume: qw cannot change in a resumed run (qw: 4 -> 2); a resumed run may change only "
            "GPU, dataPath, nThreads, test_batch_size, log_interval, eval_every, eval_start_epoch, eval_cache, "
            "tensorboard, cuda_graph, pool_cache. Add --force to change the others anyway"]
    code, lines = run_main(["--resume", run_dir, "--set", "nThreads=1", "--set", "test_batch_size=4"])
    assert code == 0 and last_json(lines)["run_dir"] == run_dir
    err = capsys.readouterr().err
    assert "--resume: nThreads changed from 0 to 1" in err and "--resume: test_batch_size changed from 8 to 4" in err
