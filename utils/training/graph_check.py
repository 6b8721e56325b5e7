"""The self-check of graphed training iterations: from one saved state, a few eager iterations and as many of a
candidate (:class:`.graphs.GraphedStep`, or any stand-in for ``trainer.step``), compared value by value.

Bit for bit with ``deterministic = true``; within :data:`TOLERANCE` otherwise. The trainer is saved and restored
through :class:`.state.TrainingState`, the same state its checkpoints hold.
"""

from __future__ import annotations

import numpy as np
import torch

from quantization_utils import has_tracked_ranges, set_act_tracking

from .state import clone_state

__all__ = ["CHECK_ITERATIONS", "TOLERANCE", "WARMUP_ITERATIONS", "CaptureError", "compare_states", "first_line",
           "iteration_kinds", "restore", "run_iterations", "self_check", "snapshot"]

WARMUP_ITERATIONS = 3  # eager iterations of a kind before its capture (lazy state, compiled kernels, handles)
CHECK_ITERATIONS = 3  # graphed iterations per kind that the self-check compares with eager ones
# Without deterministic = true, per tensor: |graphed update - eager update| <= TOLERANCE * |eager update| (norms
# over the tensor; "update": the change from the saved state), and likewise for each recorded value's series.
# Reordered floating-point sums stay far inside it; a repeated latent, a frozen learning rate or a range that no
# longer moves changes an update by its whole size.
TOLERANCE = 1e-2


class CaptureError(RuntimeError):
    """The candidate of :func:`self_check` failed (a capture torch refused); the trainer was put back first."""


def iteration_kinds(trainer) -> list[tuple[int, bool, bool]]:
    """(first epoch, trains the student, tracks ranges) of each kind of iteration in the epochs left."""
    o = trainer.options
    tracked = has_tracked_ranges(trainer.student)
    kinds: dict[tuple[bool, bool], int] = {}
    for epoch in range(trainer.epoch, o.nEpochs):
        kinds.setdefault((epoch >= o.warmup_epochs, tracked and epoch < o.act_range_epochs), epoch)
    return [(epoch, *kind) for kind, epoch in kinds.items()]


def snapshot(trainer) -> dict:
    """A copy of everything an iteration changes (:class:`.state.TrainingState`), sharing no memory with it."""
    return clone_state(trainer.training_state.state_dict())


def restore(trainer, state: dict) -> None:
    """Put ``trainer`` back where :func:`snapshot` found it; ``state`` stays untouched, to be restored again."""
    trainer.training_state.load_state_dict(clone_state(state))


def _scale_learning_rates(trainer, factor: float) -> None:
    for optimizer in filter(None, (trainer.opt_S, trainer.opt_G)):
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(factor)
            else:
                group["lr"] *= factor


def run_iterations(trainer, step, epoch: int, train_student: bool, tracking: bool, count: int) -> dict:
    """Run ``count`` iterations of ``step`` (the trainer's step, or a stand-in such as :class:`GraphedStep`) as
    iterations 0, 1, ... of ``epoch``; return :func:`snapshot` of the state after them with the recorded values
    under ``recorded`` (name -> series). The learning rates are scaled by 1, 1 + 1/count, 1 + 2/count, ... on top
    of the schedule, so that a learning rate frozen at capture shows whatever the schedule."""
    set_act_tracking(trainer.student, tracking)
    if trainer.generator is not None:
        trainer.generator.train()
    rows = []
    for it in range(count):
        trainer.epoch, trainer.iteration = epoch, it
        trainer.set_learning_rates(epoch, it)
        _scale_learning_rates(trainer, 1 + it / count)
        rows.append(step(train_student))
    state = snapshot(trainer)
    values = torch.stack(rows).detach().cpu()
    state["recorded"] = {name: values[:, i].clone() for i, name in enumerate(trainer.loss_names)}
    return state


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def compare_states(before: dict, expected: dict, actual: dict, tolerance: float = 0.0) -> list[str]:
    """The entries of two states (:func:`run_iterations` from the same ``before``) that differ, one line each.

    ``tolerance = 0``: every tensor equal bit for bit, every other value equal. Otherwise floating-point tensors
    may differ by ``tolerance`` times the size of their change from ``before`` (recorded values: of the values),
    norms over the tensor; integer tensors, random states and everything else stay exact.
    """
    flat_before, flat_expected, flat_actual = _flatten(before), _flatten(expected), _flatten(actual)
    differences = []
    for name in sorted(set(flat_expected) | set(flat_actual)):
        if name not in flat_expected or name not in flat_actual:
            differences.append(f"{name}: only in the {'graphed' if name in flat_actual else 'eager'} state")
            continue
        e, a = flat_expected[name], flat_actual[name]
        if isinstance(e, np.ndarray) and isinstance(a, np.ndarray):  # NumPy's random state
            e, a = torch.from_numpy(e.astype(np.int64)), torch.from_numpy(a.astype(np.int64))
        if not isinstance(e, torch.Tensor) or not isinstance(a, torch.Tensor):
            if type(e) is not type(a) or e != a:
                differences.append(f"{name}: {e!r} eager, {a!r} graphed")
            continue
        if e.shape != a.shape or e.dtype != a.dtype:
            differences.append(f"{name}: {tuple(e.shape)} {e.dtype} eager, {tuple(a.shape)} {a.dtype} graphed")
            continue
        e, a = e.cpu(), a.cpu()
        if torch.equal(e, a):
            continue
        if tolerance > 0 and e.is_floating_point() and e.numel():
            base = flat_before.get(name)
            change = e.double() - base.cpu().double() if isinstance(base, torch.Tensor) and base.shape == e.shape \
                else e.double()
            gap = (a.double() - e.double()).norm()
            if torch.isfinite(gap) and gap <= tolerance * change.norm():
                continue
        gap = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
        differences.append(f"{name}: max |difference| {gap:.3g}")
    return differences


def self_check(trainer, make_candidate, kinds=None, count: int = WARMUP_ITERATIONS + CHECK_ITERATIONS,
               tolerance: float = 0.0) -> list[str]:
    """Differences between ``count`` eager iterations and as many of ``make_candidate()`` (a fresh
    :class:`GraphedStep`, or any stand-in for ``trainer.step``) from the same state, for each kind of
    :func:`iteration_kinds`; each line names the kind. The trainer is put back as it was in every case.

    The kinds follow one another as in the run: each starts where the eager iterations of the one before ended, so
    that a kind with frozen activation ranges finds them tracked (a fresh channel-wise student has none before).
    """
    saved = snapshot(trainer)
    start, differences = saved, []
    try:
        for epoch, train_student, tracking in kinds if kinds is not None else iteration_kinds(trainer):
            label = f"{'student step' if train_student else 'warm-up'}{', tracking ranges' if tracking else ''}"
            expected = run_iterations(trainer, trainer.step, epoch, train_student, tracking, count)
            restore(trainer, start)
            candidate, failure = make_candidate(), None
            try:
                actual = run_iterations(trainer, candidate, epoch, train_student, tracking, count)
            except Exception as error:  # reported once the trainer is back where it was
                failure = error
            finally:
                if hasattr(candidate, "release"):
                    candidate.release()
                restore(trainer, saved)  # if this fails, the run stops: it must not go on from a half state
            if failure is not None:
                raise CaptureError(f"{label}: {first_line(failure)}") from failure
            differences += [f"{label}: {line}" for line in compare_states(start, expected, actual, tolerance)]
            start = {key: value for key, value in expected.items() if key != "recorded"}
            restore(trainer, start)
    finally:
        restore(trainer, saved)
    return differences


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message (its type's name if it has none), for a one-line report."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
