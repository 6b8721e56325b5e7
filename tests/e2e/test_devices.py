"""The command line and its devices: backend flags in the summary, GPU indices that are not there, resuming
with fewer processes. CUDA's presence is faked; no CUDA function runs."""

import json
import os
import shutil

import pytest
import torch

import utils.runs.saved as evaluate_module
from utils.runs import config

from ..conftest import last_json, run_main, tiny_run_args


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device}) was called"))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_folder):
    save_path = tmp_path_factory.mktemp("device_runs")
    code, lines = run_main(tiny_run_args(save_path, cifar_folder, "--set", "quant_impl=eager"))
    assert code == 0
    return last_json(lines)


def test_summary_records_the_flags_in_effect_and_the_quant_path(tmp_path, cifar_folder, capsys):
    # granq_impl, the former name of quant_impl, as published command lines give it: one deprecation line
    config._current_key.cache_clear()
    code, lines = run_main(tiny_run_args(tmp_path, cifar_folder, "--set", "nEpochs=0", "--set", "granq_impl=eager",
                                         "--set", "deterministic=true"))
    assert code == 0
    deprecated = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(deprecated) == 1 and deprecated[0].endswith("config key granq_impl is deprecated: read as quant_impl")
    summary = last_json(lines)
    assert summary["quant_path"] == "eager: quant_impl = eager" and summary["quant_impl"] == "eager"
    assert summary["deterministic"] is True and torch.are_deterministic_algorithms_enabled()
    # the CPU uses neither cuDNN nor TF32
    assert summary["cudnn_benchmark"] is False and summary["tf32"] == {"conv": False, "matmul": False}
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary


def test_default_run_is_not_deterministic(finished_run):
    assert finished_run["deterministic"] is False
    assert finished_run["quant_path"] == "eager: quant_impl = eager"


def test_a_gpu_index_beyond_the_visible_gpus_is_an_error(tmp_path, cifar_folder, monkeypatch, capsys):
    fake_gpus(monkeypatch, 1)
    code, lines = run_main(tiny_run_args(tmp_path / "runs", cifar_folder, "--set", "GPU=1"))
    assert code == 2 and lines == []
    assert error_line(capsys).startswith("error: GPU = 1 but 1 GPU(s) are visible")
    assert not (tmp_path / "runs").exists()


def test_eval_uses_the_gpu_key(finished_run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = []

    def cuda_device(index, source):
        chosen.append((index, source))
        return torch.device("cpu")  # evaluate here all the same

    monkeypatch.setattr(evaluate_module, "cuda_device", cuda_device)
    code, lines = run_main(["--eval", finished_run["run_dir"], "--set", "GPU=2"])
    assert code == 0 and chosen == [(2, "GPU")]
    assert last_json(lines)["student_top1"] == finished_run["student_top1"]
    code, _ = run_main(["--eval", finished_run["run_dir"]])
    assert code == 0 and chosen[-1] == (0, "GPU")  # the run's own GPU key


def test_eval_on_a_gpu_that_is_not_there_is_an_error(finished_run, monkeypatch, capsys):
    fake_gpus(monkeypatch, 1)
    code, lines = run_main(["--eval", finished_run["run_dir"], "--set", "GPU=1"])
    assert code == 2 and lines == []
    assert error_line(capsys).startswith("error: GPU = 1 but 1 GPU(s) are visible")


def copy_with_rng(finished_run, tmp_path, change) -> str:
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run["run_dir"], run_dir)
    path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = torch.load(path, weights_only=False)
    change(checkpoint["rng"])
    torch.save(checkpoint, path)
    return run_dir


def test_resuming_with_fewer_processes_is_an_error(finished_run, tmp_path, capsys):
    run_dir = copy_with_rng(finished_run, tmp_path, lambda rng: rng.append(rng[0]))  # as if by 2 processes
    code, lines = run_main(["--resume", run_dir])
    assert code == 2 and lines == []
    assert error_line(capsys) == ("error: the checkpoint was written by 2 process(es); resume it with as many "
                                  "(this run has 1)")
