import os

import pytest
import torch

from quantization_utils import QuantAct, QuantConv2d, set_act_tracking
from utils.models import build_teacher
from utils.runs.config import load_options
from utils.runs.saved import load_quantized_model
from utils.training.checkpoints import BEST_STUDENT, CHECKPOINT, RunFileError, find_student_file
from utils.training.state import capture_rng, restore_rng
from utils.training.trainer import Trainer

from ..conftest import CIFAR10_CONF, CIFAR10A_CONF


def _trained_trainer(run_dir, conf, *sets):
    options = load_options(conf, ["batchSize=4", "iters_per_epoch=2", "warmup_epochs=0", "nEpochs=1", *sets])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    trainer = Trainer(options, teacher, None, torch.device("cpu"), str(run_dir), {"id": 0, "seed": 1})
    trainer.train_epoch(0)  # moves the student's weights and its tracked ranges
    trainer.epoch = 1
    return trainer


@pytest.mark.parametrize("conf, sets", [
    (CIFAR10_CONF, ("qw=3", "qa=4")),
    (CIFAR10A_CONF, ("qw=4", "qa=3", "act_mode=layerwise", "weight_granularity=channel")),
    (CIFAR10A_CONF, ("qw=4", "qa=3", "act_mode=channel")),
])
def test_rebuilt_student_gives_identical_outputs(tmp_path, conf, sets):
    trainer = _trained_trainer(tmp_path, conf, *sets)
    trainer.save_checkpoint()
    student = load_quantized_model(str(tmp_path)).to(memory_format=trainer.memory_format)
    images = torch.randn(6, 3, 32, 32)
    set_act_tracking(trainer.student, False)  # as the trainer does before evaluating
    with torch.no_grad():
        assert torch.equal(student(images), trainer.student(images))
    assert not student.training
    assert type(student) is type(trainer.student)
    conv = next(m for m in student.modules() if isinstance(m, QuantConv2d))
    act = next(m for m in student.modules() if isinstance(m, QuantAct))
    options = trainer.options
    assert (conv.weight_bits, conv.weight_granularity, act.quant.bits, act.quant.mode) == (
        options.qw, options.weight_granularity, options.qa, options.act_mode)
    # Evaluation must not move layer-wise ranges: they are frozen after loading.
    assert not act.tracking


@pytest.mark.parametrize("act_mode", ["layerwise", "channel"])
def test_tracked_ranges_come_from_the_file(tmp_path, act_mode):
    trainer = _trained_trainer(tmp_path, CIFAR10_CONF, f"act_mode={act_mode}")
    trainer.save_checkpoint()
    saved = [m.x_max.clone() for m in trainer.student.modules() if isinstance(m, QuantAct)]
    loaded = [m.x_max for m in load_quantized_model(str(tmp_path)).modules() if isinstance(m, QuantAct)]
    assert len(saved) == len(loaded) == 19 and all((s > 0).any() for s in saved)
    assert all(torch.equal(s, t) for s, t in zip(saved, loaded))


def test_run_directory_resolves_to_the_last_student(tmp_path):
    open(tmp_path / BEST_STUDENT, "w").close()
    assert find_student_file(str(tmp_path)) == os.path.join(tmp_path, BEST_STUDENT)
    open(tmp_path / CHECKPOINT, "w").close()
    assert find_student_file(str(tmp_path)) == os.path.join(tmp_path, CHECKPOINT)
    assert find_student_file(str(tmp_path / BEST_STUDENT)) == str(tmp_path / BEST_STUDENT)


def test_unusable_paths_and_files_are_named(tmp_path):
    with pytest.raises(RunFileError, match="holds neither checkpoint.pt nor best_student.pt"):
        load_quantized_model(str(tmp_path))
    with pytest.raises(RunFileError, match="neither a checkpoint file nor a run directory"):
        load_quantized_model(str(tmp_path / "missing"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(RunFileError, match="cannot be read"):
        load_quantized_model(str(tmp_path / "junk.pt"))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(RunFileError, match="not a student checkpoint"):
        load_quantized_model(str(tmp_path / "foreign.pt"))


def test_mismatched_bits_or_architecture_are_reported(tmp_path):
    trainer = _trained_trainer(tmp_path, CIFAR10_CONF, "act_mode=layerwise")
    state = trainer.state_dict()
    state["options"] = {**state["options"], "act_mode": "granq"}  # drops the layer-wise range buffers
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(RunFileError, match=r"\(resnet20_cifar10\): the saved student does not fit the "
                                              "float model quantized with qw=3, qa=3, act_mode=granq"):
        load_quantized_model(str(tmp_path / "edited.pt"))
    del state["options"]["qa"]
    torch.save(state, tmp_path / "no_bits.pt")
    with pytest.raises(RunFileError, match="lack qa"):
        load_quantized_model(str(tmp_path / "no_bits.pt"))


@pytest.fixture
def fake_cuda_rng(monkeypatch):
    """torch.cuda's random-state calls, recorded: (call, device index)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device.index)) or
                        torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device.index,
                                                                                          int(state[0]))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was read"))
    return calls


def test_a_checkpoint_holds_the_cuda_state_of_the_runs_own_gpu_only(fake_cuda_rng):
    state = capture_rng(torch.device("cuda", 5))
    assert fake_cuda_rng == [("get", 5)] and int(state["cuda"][0]) == 5
    # written on GPU 5 of 8, resumed where one GPU is visible
    restore_rng(state, torch.device("cuda", 0))
    assert fake_cuda_rng[-1] == ("set", 0, 5)


def test_an_earlier_checkpoint_with_every_gpus_state_restores_its_own(fake_cuda_rng):
    state = {**capture_rng(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(2)]}
    restore_rng(state, torch.device("cuda", 1))
    assert fake_cuda_rng == [("set", 1, 1)]
    with pytest.raises(RunFileError, match="random states of 2 GPU\\(s\\), none for GPU 3"):
        restore_rng(state, torch.device("cuda", 3))


def test_the_noise_generator_state_is_saved_and_restored():
    noise = torch.Generator().manual_seed(7)
    state = capture_rng(torch.device("cpu"), noise)
    first = torch.randn(4, generator=noise)
    restore_rng(state, torch.device("cpu"), noise)
    assert torch.equal(torch.randn(4, generator=noise), first)
