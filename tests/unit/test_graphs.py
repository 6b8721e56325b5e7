"""How a run chooses between graphed and eager iterations, and the self-check that compares them (on the CPU:
eager against eager, and stand-ins for captures that change what is computed)."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from checks.graph_probe import MODES, FrozenLearningRates, FrozenRanges, RepeatedLatents
from utils.models import build_teacher
from utils.runs.config import load_options
from utils.system import distributed
from utils.system.errors import ConfigError, UserError
from utils.training import graphs
from utils.training.graphs import (
    GraphedStep,
    check_cuda_graph,
    compare_states,
    eager_reason,
    iteration_kinds,
    restore,
    self_check,
    snapshot,
    use_cuda_graphs,
)
from utils.training.optim import build_optimizers, load_optimizer_state, optimizer_settings
from utils.training.pools import run_pool
from utils.training.state import clone_state
from utils.training.trainer import Trainer

from ..conftest import CIFAR10_CONF

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
COUNT = 3  # iterations per branch in these checks: the stand-ins differ from the second one on


def make_trainer(tmp_path, *sets):
    options = load_options(CIFAR10_CONF, ["batchSize=4", "iters_per_epoch=4", "nEpochs=2", "warmup_epochs=1",
                                          "quant_impl=eager", "teacher_weights=random", *sets])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    return Trainer(options, teacher, None, CPU, str(tmp_path), {"id": 0, "seed": 1}, run_pool(options, teacher, CPU))


def test_cuda_graph_takes_auto_on_or_off_and_is_off_by_default():
    assert load_options(CIFAR10_CONF).cuda_graph == "off"
    for mode in ("auto", "on", "off"):
        assert load_options(CIFAR10_CONF, [f"cuda_graph={mode}"]).cuda_graph == mode
    with pytest.raises(ConfigError, match="cuda_graph = 'true' is not valid; choose one of: auto, on, off"):
        load_options(CIFAR10_CONF, ["cuda_graph=true"])


def test_why_a_run_is_eager(monkeypatch):
    assert eager_reason("off", CUDA) == "eager: cuda_graph = off"
    assert eager_reason("auto", CPU) == eager_reason("on", CPU) == "eager: no CUDA device"
    assert eager_reason("auto", CUDA) is None and eager_reason("on", CUDA) is None
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert eager_reason("auto", CUDA).startswith("eager: torchrun (2 processes")


def test_on_is_refused_where_it_cannot_be_had(monkeypatch):
    for mode in ("auto", "off"):
        check_cuda_graph(mode, CPU)
    check_cuda_graph("on", CUDA)
    with pytest.raises(UserError, match="cuda_graph = on needs CUDA, and this run is on cpu"):
        check_cuda_graph("on", CPU)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(UserError, match=r"cuda_graph = on is not available under torchrun \(2 processes"):
        check_cuda_graph("on", CUDA)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedStep(type("T", (), {"device": CPU})())


@pytest.mark.parametrize("mode, recorded", [("auto", "eager: no CUDA device"), ("off", "eager: cuda_graph = off")])
def test_a_cpu_run_is_eager_and_its_summary_says_why(tmp_path, mode, recorded):
    trainer = make_trainer(tmp_path)
    trainer.graphed_step = object()  # whatever was there: the decision replaces it
    assert use_cuda_graphs(trainer, mode) == recorded
    assert trainer.graphed_step is None
    assert trainer.summary()["cuda_graph"] == recorded


def test_one_kind_of_iteration_per_stretch_of_epochs(tmp_path):
    trainer = make_trainer(tmp_path, "nEpochs=6", "warmup_epochs=4", "act_mode=layerwise", "act_range_epochs=2")
    # (first epoch, student step, ranges tracked)
    assert iteration_kinds(trainer) == [(0, False, True), (2, False, False), (4, True, False)]
    trainer.epoch = 3  # a resumed run checks only what it has left
    assert iteration_kinds(trainer) == [(3, False, False), (4, True, False)]
    assert iteration_kinds(make_trainer(tmp_path, "nEpochs=3")) == [(0, False, False), (1, True, False)]
    trainer.epoch = 6
    assert iteration_kinds(trainer) == []


def test_compare_states_names_what_differs():
    before = {"student": {"w": torch.zeros(4)}, "rng": {"noise": torch.tensor([1, 2], dtype=torch.uint8)}}
    expected = {"student": {"w": torch.full((4,), 1.0)}, "rng": {"noise": torch.tensor([3, 4], dtype=torch.uint8)},
                "recorded": {"loss_S": torch.tensor([2.0, 3.0])}, "position": [1, 2]}
    assert compare_states(before, expected, clone_state(expected)) == []
    nudged = clone_state(expected)
    nudged["student"]["w"][0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp
    assert compare_states(before, expected, nudged) == ["student.w: max |difference| 1.19e-07"]
    # within the tolerance: an update of size 2 changed by 1.2e-7
    assert compare_states(before, expected, nudged, tolerance=1e-2) == []
    moved = clone_state(expected)
    moved["student"]["w"] *= 0.5  # half the update: a learning rate that did not change
    moved["rng"]["noise"][0] = 9
    moved["recorded"]["loss_S"][1] = 3.5
    moved["position"] = [1, 3]
    assert {line.split(":")[0] for line in compare_states(before, expected, moved, tolerance=1e-2)} == {
        "position.1", "recorded.loss_S", "rng.noise", "student.w"}
    missing = clone_state(expected)
    del missing["recorded"]
    assert compare_states(before, expected, missing) == ["recorded.loss_S: only in the eager state"]


def test_eager_against_eager_agrees_bit_for_bit_and_leaves_the_trainer_as_it_was(tmp_path):
    trainer = make_trainer(tmp_path, "student_losses=[kd, pseudo_label]")
    trainer.step(train_student=True)  # some optimizer state to restore
    before = snapshot(trainer)
    assert self_check(trainer, lambda: trainer.step, count=COUNT) == []
    assert compare_states(before, before, snapshot(trainer)) == []


@pytest.mark.parametrize("stand_in, sets, must_name", [
    # the noise stream did not move on: its state and everything the latents feed
    (RepeatedLatents, [], ["rng.0.noise", "generator.", "recorded.loss_G"]),
    # the rates of the first iteration: the optimizers' recorded rates and both networks' weights
    (FrozenLearningRates, ["warmup_epochs=0"], ["opt_S.param_groups.0.lr", "opt_G.param_groups.0.lr", "student."]),
    # ranges that stopped moving while they should be tracked
    (FrozenRanges, ["act_mode=layerwise", "warmup_epochs=0", "act_range_epochs=1"], ["x_max", "momentum_power"]),
])
def test_the_self_check_catches_a_capture_that_changes_what_is_computed(tmp_path, stand_in, sets, must_name):
    trainer = make_trainer(tmp_path, *sets)
    before = snapshot(trainer)
    for tolerance in (0.0, graphs.TOLERANCE):
        differences = self_check(trainer, lambda: stand_in(trainer), iteration_kinds(trainer)[:1], count=COUNT,
                                 tolerance=tolerance)
        for name in must_name:
            assert any(name in line for line in differences), (name, differences[:5])
    assert compare_states(before, before, snapshot(trainer)) == []


def test_a_run_that_cannot_graph_falls_back_or_stops(tmp_path, monkeypatch):
    """The decision on a CUDA device, its self-check replaced by one that differs or fails (no GPU needed)."""
    trainer = make_trainer(tmp_path)
    trainer.graphed_step = object()
    monkeypatch.setattr(graphs, "eager_reason", lambda mode, device: None)
    monkeypatch.setattr(graphs, "self_check", lambda *args, **kwargs: ["student step: student.w: max |difference| 1"])
    assert use_cuda_graphs(trainer, "auto") == "eager: self-check differed (student step: student.w: max " \
                                                "|difference| 1)"
    assert trainer.graphed_step is None
    with pytest.raises(UserError, match=r"cuda_graph = on: self-check differed .*set cuda_graph = auto"):
        use_cuda_graphs(trainer, "on")

    def refused(*args, **kwargs):
        raise graphs.CaptureError("student step: operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "self_check", refused)
    assert use_cuda_graphs(trainer, "auto") == "eager: capture failed (student step: operation not permitted " \
                                                "when stream is capturing)"
    with pytest.raises(UserError, match="cuda_graph = on: capture failed"):
        use_cuda_graphs(trainer, "on")


def test_a_failing_candidate_is_a_capture_error_and_the_trainer_is_put_back(tmp_path):
    trainer = make_trainer(tmp_path)
    before = snapshot(trainer)
    calls = []

    def failing(train_student=True):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\ndetails")
        return trainer.step(train_student)

    with pytest.raises(graphs.CaptureError, match="^warm-up: CUDA error: operation not permitted when stream is "
                                                  "capturing$"):
        self_check(trainer, lambda: failing, count=COUNT)
    assert compare_states(before, before, snapshot(trainer)) == []


def test_a_checkpoint_keeps_the_values_and_the_run_keeps_its_optimizer(tmp_path):
    """A CPU checkpoint resumed where the optimizers hold tensor learning rates (CUDA), and the other way round."""
    trainer = make_trainer(tmp_path)
    trainer.set_learning_rates(1)
    trainer.step(train_student=True)
    plain = trainer.opt_G.state_dict()
    # a generator optimizer as CUDA builds it, on the CPU: fused, learning rate in a tensor
    params = [torch.nn.Parameter(p.detach().clone()) for p in trainer.generator_params]
    rate = torch.tensor(5.0)
    fused = torch.optim.Adam(params, lr=rate, fused=True)
    load_optimizer_state(fused, plain)
    group = fused.param_groups[0]
    assert group["lr"] is rate and rate.item() == pytest.approx(plain["param_groups"][0]["lr"])
    assert group["fused"] is True
    assert all(s["step"].dtype == torch.float32 for s in fused.state.values())
    # and back: the plain optimizer keeps a float rate and its own implementation
    load_optimizer_state(trainer.opt_G, fused.state_dict())
    assert isinstance(trainer.opt_G.param_groups[0]["lr"], float) and not trainer.opt_G.param_groups[0]["fused"]
    opt_S, opt_G = build_optimizers(trainer.options, trainer.student_params, trainer.generator_params)
    assert all(isinstance(g["lr"], float) for opt in (opt_S, opt_G) for g in opt.param_groups)  # CPU: plain ones


def test_capture_optimizers_only_where_a_graph_is_captured(tmp_path):
    assert optimizer_settings("cuda", capturable=False) == {"foreach": True}  # float learning rates, no warning
    assert optimizer_settings("cuda", capturable=True) == {"fused": True, "capturable": True}
    assert optimizer_settings("cpu", capturable=False) == optimizer_settings("cpu", capturable=True) == {}
    for mode in ("off", "auto", "on"):
        assert not graphs.may_capture(mode, CPU)
    assert not graphs.may_capture("off", CUDA)
    trainer = make_trainer(tmp_path, "cuda_graph=auto")
    assert not trainer.capturable and trainer.progress_tensor is None
    assert all(isinstance(g["lr"], float) for opt in (trainer.opt_S, trainer.opt_G) for g in opt.param_groups)


class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass


class FakeCuda(graphs.CudaCalls):
    """torch.cuda as GraphedStep calls it, on the CPU. A capture runs the step, then puts the trainer back (a real
    capture records work and runs none) and fails at its end without leaving its stream, as ``torch.cuda.graph``
    does when ``capture_end`` raises."""

    def __init__(self, trainer):
        self.trainer, self.main, self.captures = trainer, FakeStream("main"), 0
        self.current = self.main

    def check_device(self, device):
        pass

    def new_stream(self, device):
        return FakeStream("side")

    def current_stream(self, device):
        return self.current

    def set_stream(self, stream):
        self.current = stream

    @contextlib.contextmanager
    def on_stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def new_graph(self):
        return object()

    @contextlib.contextmanager
    def capture(self, graph, stream):
        self.captures += 1
        saved = snapshot(self.trainer)
        self.current = stream
        yield
        restore(self.trainer, saved)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nat capture_end")


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_failed_capture_leaves_a_usable_process(tmp_path, monkeypatch, caplog, mode):
    monkeypatch.setattr(graphs, "_failed_capture", None)
    trainer, reference = make_trainer(tmp_path / "graphed"), make_trainer(tmp_path / "eager")  # the same run twice
    fake = FakeCuda(trainer)
    monkeypatch.setattr(graphs, "CUDA", fake)
    registered = trainer.noise
    trainer.graphed_step = GraphedStep(trainer, warmup=1, on_failure=graphs._fall_back(trainer, mode))
    for it in range(22):  # one eager iteration on the side stream, the failed capture, then 20 eager ones
        for run in (trainer, reference):
            run.set_learning_rates(1, it)
        if it == 1 and mode == "on":
            with pytest.raises(UserError, match=r"^cuda_graph = on: capture failed at epoch 1 \(CUDA error: "
                                                r"operation not permitted when stream is capturing\); set"):
                trainer.graphed_step(True)
            assert fake.current is fake.main and trainer.noise is not registered
            return
        values = (trainer.graphed_step or trainer.step)(True)
        assert torch.equal(values, reference.step(True)), it  # the noise stream went on where it was
    assert fake.captures == 1 and fake.current is fake.main  # no second capture; back on the main stream
    assert trainer.noise is not registered  # a fresh generator, with the state the registered one had
    assert trainer.graphed_step is None and trainer.meta["cuda_graph"].startswith("eager: capture failed at epoch 1")
    assert compare_states(snapshot(reference), snapshot(reference), snapshot(trainer)) == []
    assert [r.getMessage() for r in caplog.records if r.name == "granq" and r.levelname == "WARNING"] == [
        "cuda_graph = auto: capture failed at epoch 1 (CUDA error: operation not permitted when stream is "
        "capturing); training runs eager"]
    assert graphs.capture_failed() is not None
    assert eager_reason("auto", CUDA).startswith("eager: a CUDA graph capture failed earlier in this process")


def test_a_capture_that_fails_in_the_self_check_leaves_the_trainer_and_its_noise_as_they_were(tmp_path, monkeypatch):
    monkeypatch.setattr(graphs, "_failed_capture", None)
    trainer = make_trainer(tmp_path)
    before, registered = snapshot(trainer), trainer.noise
    monkeypatch.setattr(graphs, "CUDA", FakeCuda(trainer))
    monkeypatch.setattr(graphs, "eager_reason", lambda mode, device: None)
    assert use_cuda_graphs(trainer, "auto").startswith("eager: capture failed (warm-up: CUDA error: operation not "
                                                       "permitted when stream is capturing)")
    assert trainer.noise is not registered and graphs.CUDA.current is graphs.CUDA.main
    assert compare_states(before, before, snapshot(trainer)) == []
    trainer.step(True)  # and the run goes on


# ATen operations that torch.use_deterministic_algorithms(True) refuses on CUDA (they raise there), from the list in
# that function's documentation, by the names a training step would call them.
CUDA_NONDETERMINISTIC = {
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "avg_pool3d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d", "reflection_pad1d_backward",
    "reflection_pad2d_backward", "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward", "put_",
    "histc", "bincount", "median", "grid_sampler_2d_backward", "grid_sampler_3d_backward", "_embedding_bag_backward",
}


class OperatorLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_a_deterministic_step_calls_no_operation_that_cuda_refuses(tmp_path, mode):
    """deterministic = true on CUDA raises at any operation torch has no deterministic CUDA kernel for: none may
    run in a step of any mode (the CPU runs the same operators, forward and backward)."""
    trainer = make_trainer(tmp_path, *MODES[mode], "deterministic=true")
    torch.use_deterministic_algorithms(True)
    for train_student in (False, True):
        with OperatorLog() as log:
            trainer.step(train_student)
        assert not log.names & CUDA_NONDETERMINISTIC, sorted(log.names & CUDA_NONDETERMINISTIC)


def test_a_run_on_a_pool_checks_and_restores_without_a_generator(tmp_path):
    trainer = make_trainer(tmp_path, *MODES["pool"], "student_losses=[kd, cam]")
    assert trainer.generator is None and trainer.opt_G is None
    assert any(t is trainer.pool.images for t in graphs._graph_tensors(trainer))  # the graph reads the pool in place
    trainer.step(train_student=True)
    before = snapshot(trainer)
    assert "generator" not in before and "opt_G" not in before
    assert self_check(trainer, lambda: trainer.step, count=COUNT) == []
    assert compare_states(before, before, snapshot(trainer)) == []
    # a capture that repeats the first iteration's draws of images and crops
    differences = self_check(trainer, lambda: RepeatedLatents(trainer), iteration_kinds(trainer)[-1:], count=COUNT)
    assert any(line.startswith("student step: rng.0.noise") for line in differences), differences[:5]
    assert any("student." in line for line in differences)
    assert compare_states(before, before, snapshot(trainer)) == []
