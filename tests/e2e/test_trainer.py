import json
import os

import pytest
import torch

import utils.training.losses.kd as kd_module
from quantization_utils import QuantAct
from utils.data.loaders import build_test_loader
from utils.models import build_teacher
from utils.runs.config import load_options
from utils.training.optim import learning_rate
from utils.training.trainer import Trainer

from ..conftest import (
    CIFAR10_CONF,
    CIFAR10_JPEG,
    CIFAR10A_CONF,
    RESNET20A_WEIGHTS,
    last_json,
    needs_shared_data,
    run_main,
    tiny_run_args,
)

# the student's spec (StudentSpec.to_dict) at the top level, among the rest
EXPECTED_IN_SUMMARY = {"teacher_top1", "student_top1", "best_top1", "best_top5", "epochs", "qw", "qa", "act_mode",
                       "weight_granularity", "act_momentum", "quant_impl", "act_types", "network", "seconds",
                       "run_dir", "cuda_graph", "quant_path"}


def test_two_iteration_run_writes_its_outputs(tmp_path, cifar_folder):
    code, lines = run_main(tiny_run_args(tmp_path / "runs", cifar_folder))
    assert code == 0
    summary = last_json(lines)
    assert EXPECTED_IN_SUMMARY <= summary.keys()
    assert (summary["epochs"], summary["qw"], summary["qa"], summary["act_mode"]) == (1, 4, 4, "granq")
    run_dir = summary["run_dir"]
    assert os.path.dirname(run_dir) == str(tmp_path / "runs")
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f) == summary
    # cuda_graph = off (the default until a GPU check has passed): eager, and the summary says why
    assert summary["cuda_graph"] == "eager: cuda_graph = off"
    for name in ("config.hocon", "train.log", "metrics.jsonl", "checkpoint.pt", "best_student.pt", "accuracy.png",
                 "losses.png"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1]
    assert {"loss_G", "loss_S", "bns", "onehot", "marginal", "student_top1", "lr_S", "lr_G"} <= records[0].keys()
    assert load_options(os.path.join(run_dir, "config.hocon")).iters_per_epoch == 2
    # not a terminal: plain progress lines that name every loss
    with open(os.path.join(run_dir, "train.log")) as f:
        progress = [line for line in f if "epoch 1/1 iter 2/2" in line]
    assert len(progress) == 1
    assert all(f" {name} " in progress[0] for name in ("loss_G", "marginal", "onehot", "bns", "loss_S"))


def test_eval_flag_reproduces_a_saved_student(tmp_path, cifar_folder):
    summary = last_json(run_main(tiny_run_args(tmp_path, cifar_folder))[1])
    code, lines = run_main(["--eval", summary["run_dir"], "--set", "nThreads=0"])
    evaluated = last_json(lines)
    assert code == 0
    assert (evaluated["student_top1"], evaluated["student_top5"]) == (summary["student_top1"],
                                                                      summary["student_top5"])
    assert evaluated["recorded_top1"] == summary["student_top1"] and evaluated["qa"] == 4


def test_runs_never_overwrite_each_other(tmp_path, cifar_folder):
    args = tiny_run_args(tmp_path, cifar_folder, "--set", "nEpochs=0")
    first = last_json(run_main(args)[1])["run_dir"]
    marker = os.path.join(first, "keep.txt")
    open(marker, "w").close()
    second = last_json(run_main(args)[1])["run_dir"]
    assert first != second and os.path.exists(marker)


def test_bad_config_fails_before_creating_a_run_dir(tmp_path, cifar_folder, capsys):
    code, lines = run_main(tiny_run_args(tmp_path / "runs", cifar_folder, "--set", "batchSize=big"))
    assert code == 2 and lines == []
    assert "error: batchSize must be an integer, got 'big'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


@pytest.fixture
def small_trainer(tmp_path, cifar_folder):
    def make(*sets):
        options = load_options(CIFAR10_CONF, [f"dataPath={cifar_folder}", "nThreads=0", "test_batch_size=10",
                                              "batchSize=4", "iters_per_epoch=3", "log_interval=2", *sets])
        teacher, _ = build_teacher(options.network, "random")
        loader = CountingLoader(build_test_loader(options))
        return Trainer(options, teacher, loader, torch.device("cpu"), str(tmp_path), {"id": 0, "seed": 1}), loader

    return make


class CountingLoader:
    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def test_training_never_reads_real_data(small_trainer):
    trainer, loader = small_trainer("nEpochs=2", "warmup_epochs=0")
    trainer.train_epoch(0)
    assert loader.passes == 0
    trainer.fit()
    assert loader.passes == 1 + 2  # the teacher once, the student after each epoch


def test_warmup_trains_only_the_generator(small_trainer):
    trainer, _ = small_trainer("nEpochs=2", "warmup_epochs=1")
    student0 = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    generator0 = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    trainer.train_epoch(0)
    assert all(torch.equal(v, student0[k]) for k, v in trainer.student.state_dict().items())
    assert any(not torch.equal(v, generator0[k]) for k, v in trainer.generator.state_dict().items())
    trainer.train_epoch(1)
    assert any(not torch.equal(v, student0[k]) for k, v in trainer.student.state_dict().items())
    # the student stays in eval mode: BatchNorm statistics are never updated
    assert not trainer.student.training
    assert all(torch.equal(trainer.student.state_dict()[k], student0[k]) for k in student0 if "running" in k)


def test_student_loss_uses_the_configured_temperature(small_trainer, monkeypatch):
    seen = []
    real = kd_module.kd_loss
    monkeypatch.setattr(kd_module, "kd_loss", lambda t, s, temperature: seen.append(temperature) or real(
        t, s, temperature))
    trainer, _ = small_trainer("temperature=7.5", "warmup_epochs=0")
    trainer.train_epoch(0)
    assert seen == [7.5] * 3


@pytest.mark.parametrize("act_mode", ["layerwise", "channel"])
def test_tracked_ranges_tracked_then_frozen(small_trainer, act_mode):
    trainer, _ = small_trainer(f"act_mode={act_mode}", "act_range_epochs=1", "nEpochs=2", "warmup_epochs=0")
    act = next(m for m in trainer.student.modules() if isinstance(m, QuantAct))
    trainer.train_epoch(0)
    after_first = act.x_max.clone()
    assert (after_first > 0).any()
    trainer.train_epoch(1)
    assert torch.equal(act.x_max, after_first)


@pytest.mark.parametrize("act_mode, channels", [("layerwise", ()), ("channel", (16,))])
def test_tracked_ranges_without_training_are_calibrated(small_trainer, act_mode, channels):
    trainer, _ = small_trainer(f"act_mode={act_mode}", "nEpochs=0")
    summary = trainer.fit()
    act = next(m for m in trainer.student.modules() if isinstance(m, QuantAct))
    assert act.x_max.shape == channels and (act.x_max > act.x_min).any()
    assert summary["epochs"] == 0 and summary["student_top1"] is not None


def test_learning_rate_policies():
    assert [learning_rate(1.0, "multi_step", [2, 4], 0.1, e) for e in range(6)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert learning_rate(0.5, "const", [1], 0.1, 9) == 0.5


@needs_shared_data
def test_resnet20a_full_precision_and_w8a8_on_shared_data(tmp_path):
    args = ["--conf_path", CIFAR10A_CONF, "--id", "1", "--qw", "8", "--qa", "8",
            "--set", f"teacher_weights={RESNET20A_WEIGHTS}", "--set", f"dataPath={CIFAR10_JPEG}",
            "--set", "nEpochs=0", "--set", f"save_path={tmp_path}", "--set", "nThreads=2"]
    code, lines = run_main(args)
    summary = last_json(lines)
    assert code == 0
    assert summary["teacher_top1"] == pytest.approx(81.0, abs=0.1)
    assert abs(summary["student_top1"] - summary["teacher_top1"]) <= 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: device syncs exist only there")
@pytest.mark.parametrize("student_loss", [[], ["student_losses=[kd, attention, cam, reliable_ce, pseudo_label]",
                                               "student_input_filter=lowpass"]])
def test_training_step_never_synchronizes_the_device(tmp_path, student_loss):
    options = load_options(CIFAR10_CONF, ["batchSize=8", "warmup_epochs=0", *student_loss])
    teacher, _ = build_teacher(options.network, "random")
    trainer = Trainer(options, teacher, None, torch.device("cuda"), str(tmp_path), {"id": 0, "seed": 1})
    for _ in range(2):  # compilation and its one-time check against eager happen here
        trainer.step(train_student=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.step(train_student=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
