"""The one owner of what a training iteration changes (utils/training/state.py): a trainer restored from its state
repeats its iterations bit for bit, in every mode; and no autograd graph outlives an iteration. These are the
invariants a CUDA graph capture relies on, checked on the CPU."""

import gc

import pytest
import torch

from quantization_utils import QuantAct
from utils.models import build_teacher
from utils.runs.config import load_options
from utils.training.graph_check import compare_states, iteration_kinds, run_iterations, self_check, snapshot
from utils.training.losses import student_loss_names
from utils.training.state import RUN_STATE, TrainingState
from utils.training.trainer import Trainer

from ..conftest import CIFAR10_CONF

CPU = torch.device("cpu")
COUNT = 3  # iterations run twice from the saved state

# Every act_mode, each registered term of student_losses (beside kd), and the input filter; each with a warm-up and
# a student epoch.
MODES = {
    "granq": [],
    "layerwise": ["act_mode=layerwise"],
    "channel": ["act_mode=channel"],
    **{term: [f"student_losses=[kd, {term}]"] for term in student_loss_names() if term != "kd"},
    "lowpass": ["student_input_filter=lowpass"],
}


def fresh_trainer(tmp_path, *sets):
    options = load_options(CIFAR10_CONF, ["batchSize=4", "iters_per_epoch=4", "nEpochs=2", "warmup_epochs=1",
                                          "act_range_epochs=1", "quant_impl=eager", "teacher_weights=random", *sets])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    return Trainer(options, teacher, None, CPU, str(tmp_path), {"id": 0, "seed": 1})


@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_trainer_restored_from_its_state_repeats_its_iterations_bit_for_bit(tmp_path, mode):
    trainer = fresh_trainer(tmp_path, *MODES[mode])
    saved = snapshot(trainer)
    kinds = iteration_kinds(trainer)
    assert [kind[1] for kind in kinds] == [False, True]  # a warm-up and a student step (layer-wise: ranges tracked)
    # For each kind: COUNT iterations, restore, COUNT again; every tensor and value of the two states is compared.
    assert self_check(trainer, lambda: trainer.step, kinds, count=COUNT) == []
    assert compare_states(saved, saved, snapshot(trainer)) == []  # and the trainer is back where it started


def test_ranges_that_were_empty_when_saved_are_empty_again(tmp_path):
    trainer = fresh_trainer(tmp_path, "act_mode=channel")
    acts = [m for m in trainer.student.modules() if isinstance(m, QuantAct)]
    state = TrainingState(trainer)
    saved = snapshot(trainer)
    assert all(act.x_min.numel() == 0 for act in acts)
    run_iterations(trainer, trainer.step, 0, False, True, 1)  # tracking sizes them: one range per channel
    assert all(act.x_min.numel() > 0 for act in acts)
    state.load_state_dict(saved)
    assert all(getattr(act, name).shape == (0,) for act in acts for name in ("running_min", "x_min", "x_max"))
    # the other way round: sized ranges saved, loaded into empty ones
    run_iterations(trainer, trainer.step, 0, False, True, 1)
    sized = snapshot(trainer)
    state.load_state_dict(saved)
    state.load_state_dict(sized)
    assert compare_states(sized, sized, snapshot(trainer)) == []


def test_the_checkpoint_is_the_training_state_with_the_options_and_metadata(tmp_path):
    trainer = fresh_trainer(tmp_path)
    record = trainer.state_dict()
    assert set(record) == {"format", "options", "meta"} | set(TrainingState(trainer).state_dict())
    assert {"student", "generator", "opt_S", "opt_G", "rng", "history", *RUN_STATE} <= set(record)


def _live_graph_tensors() -> dict[int, torch.Tensor]:
    gc.collect()
    found = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                found[id(obj)] = obj
        except ReferenceError:  # a weak proxy whose referent is gone
            continue
    return found


@pytest.mark.parametrize("mode", MODES)
def test_no_autograd_graph_outlives_a_step(tmp_path, mode):
    before = set(_live_graph_tensors())
    trainer = fresh_trainer(tmp_path, *MODES[mode])
    for train_student in (False, True):
        trainer.step(train_student)
        alive = {key: t for key, t in _live_graph_tensors().items() if key not in before}
        assert not alive, [(tuple(t.shape), type(t.grad_fn).__name__) for t in alive.values()][:5]
