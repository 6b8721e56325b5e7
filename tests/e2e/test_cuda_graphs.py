"""CUDA only: graphed training iterations equal eager ones bit for bit (deterministic = true), for the default
loss, every add-on term, lowpass and layer-wise ranges while they are tracked; whole runs graphed and eager give
the same student; a capture that changes what is computed falls back to eager."""

import pytest
import torch

from checks.graph_probe import MODES, make_trainer
from utils.system.errors import UserError
from utils.training import graphs
from utils.training.graphs import (
    CHECK_ITERATIONS,
    WARMUP_ITERATIONS,
    GraphedStep,
    iteration_kinds,
    self_check,
    use_cuda_graphs,
)

from ..conftest import last_json, run_main, tiny_run_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: graphs exist only there")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def captures_allowed(monkeypatch):
    """Each test may capture, whatever capture failed in an earlier one (a run makes none after a failure)."""
    monkeypatch.setattr(graphs, "_failed_capture", None)


@pytest.mark.parametrize("mode", MODES)
def test_graphed_iterations_equal_eager_ones(tmp_path, mode):
    trainer = make_trainer(mode, CUDA, str(tmp_path), deterministic=True, batch=8)
    made = []

    def graphed():
        made.append(GraphedStep(trainer))
        return made[-1]

    kinds = iteration_kinds(trainer)
    assert len(kinds) == 2  # warm-up and student step; layerwise: tracking and frozen student steps
    assert self_check(trainer, graphed, kinds) == []
    # each kind was captured once and replayed: the comparison was of graphs, not of eager iterations
    assert [step.captures for step in made] == [1] * len(kinds)


def test_a_graphed_run_trains_the_student_of_an_eager_run(tmp_path, cifar_folder):
    common = ["--set", "deterministic=true", "--set", "nEpochs=2", "--set", "warmup_epochs=1",
              "--set", f"iters_per_epoch={WARMUP_ITERATIONS + CHECK_ITERATIONS + 2}", "--set", "log_interval=2"]
    summaries = {}
    for mode in ("on", "off"):
        code, lines = run_main(tiny_run_args(tmp_path / mode, cifar_folder, *common, "--set", f"cuda_graph={mode}"))
        assert code == 0
        summaries[mode] = last_json(lines)
    assert summaries["on"]["cuda_graph"] == "graphed"
    assert summaries["off"]["cuda_graph"] == "eager: cuda_graph = off"
    assert summaries["on"]["student_sha256"] == summaries["off"]["student_sha256"]
    assert summaries["on"]["student_top1"] == summaries["off"]["student_top1"]


def test_an_unregistered_noise_generator_never_replays_repeated_latents(tmp_path, monkeypatch):
    """Whatever this torch does with a generator that was not registered with the graph (older releases keep its
    offset frozen, so latents repeat; newer ones register it by themselves at its first draw), a run never trains
    on repeated latents: either the self-check finds the graphed iterations equal to eager ones (the stream
    moved on), or it falls back to eager with the reason."""
    class UnregisteredGraph(torch.cuda.CUDAGraph):
        def register_generator_state(self, generator):
            pass

    monkeypatch.setattr(graphs.CUDA, "new_graph", lambda: UnregisteredGraph())
    trainer = make_trainer("default", CUDA, str(tmp_path), deterministic=True, batch=8)
    decision = use_cuda_graphs(trainer, "auto")
    if decision == "graphed":
        made = []
        assert self_check(trainer, lambda: made.append(GraphedStep(trainer)) or made[-1]) == []
        assert [step.captures for step in made] == [1] * len(made)
    else:
        assert decision.startswith(("eager: self-check differed", "eager: capture failed")), decision
        assert trainer.graphed_step is None
        with pytest.raises(UserError, match="cuda_graph = on: "):
            use_cuda_graphs(trainer, "on")


def test_a_learning_rate_frozen_at_capture_is_caught(tmp_path):
    trainer = make_trainer("default", CUDA, str(tmp_path), deterministic=True, batch=8)
    for group in trainer.opt_G.param_groups:  # a float rate: a graph would keep the value it was captured with
        group["lr"] = float(group["lr"])
    decision = use_cuda_graphs(trainer, "auto")
    assert decision.startswith(("eager: self-check differed", "eager: capture failed")), decision


def test_the_check_is_not_fooled_without_determinism(tmp_path):
    """deterministic = false: the run still graphs (the tolerance holds reordered sums) and the result is close."""
    trainer = make_trainer("default", CUDA, str(tmp_path), deterministic=False, batch=8)
    assert self_check(trainer, lambda: GraphedStep(trainer), tolerance=graphs.TOLERANCE) == []
