"""The training iteration replayed as a CUDA graph (``cuda_graph = auto | on | off``).

:meth:`.trainer.Trainer.step` stays the definition of one iteration. On CUDA, :class:`GraphedStep` runs it the
way PyTorch's whole-network capture does: a few eager iterations on a side stream, then one capture of the whole
step (noise, the three forward passes, every loss, both backward passes and both optimizer steps, the recorded
values) with ``torch.cuda.graph``, then ``replay()`` for every later iteration of that kind. Kinds are the
iterations that compute different things: warm-up (no student step) or not, activation ranges tracked or not;
they change only at epoch boundaries and never come back, so one graph is alive at a time. The eager iterations
before a capture are the run's own: nothing is computed twice.

What a replay must read anew lives in memory the graph reads: the learning rates and the student's progress
are device tensors written in place before each iteration (:mod:`.optim`), and the noise generator is
registered with the graph, so each replay draws the next latents and labels of the run's stream (and a resumed
run continues it). The static output is the tensor of recorded values, copied out after each replay.

At the start of a run :func:`use_cuda_graphs` checks, for every kind the run has left, a few graphed iterations
against eager ones from the same saved state (:func:`self_check`, :func:`compare_states`): bit for bit with
``deterministic = true``, within :data:`TOLERANCE` otherwise. A difference or a capture error falls back to eager
(``auto``, one warning) or stops (``on``). Under torchrun the run is eager (DDP's reducer is not captured here).
"""

from __future__ import annotations

import logging

import torch

from quantization_utils import has_tracked_ranges, set_act_tracking

from ..system import distributed
from ..system.errors import UserError
from .checkpoints import capture_rng, state_of
from .optim import load_optimizer_state

__all__ = ["CHECK_ITERATIONS", "CUDA_GRAPH_MODES", "TOLERANCE", "WARMUP_ITERATIONS", "CaptureError", "GraphedStep",
           "check_cuda_graph", "compare_states", "eager_reason", "iteration_kinds", "restore", "run_iterations",
           "self_check", "snapshot", "use_cuda_graphs"]

logger = logging.getLogger("granq")

CUDA_GRAPH_MODES = ("auto", "on", "off")
WARMUP_ITERATIONS = 3  # eager iterations of a kind before its capture (lazy state, compiled kernels, handles)
CHECK_ITERATIONS = 3  # graphed iterations per kind that the self-check compares with eager ones
# Without deterministic = true, per tensor: |graphed update - eager update| <= TOLERANCE * |eager update| (norms
# over the tensor; "update": the change from the saved state), and likewise for each recorded value's series.
# Reordered floating-point sums stay far inside it; a repeated latent, a frozen learning rate or a range that no
# longer moves changes an update by its whole size.
TOLERANCE = 1e-2


class CaptureError(RuntimeError):
    """The candidate of :func:`self_check` failed (a capture torch refused); the trainer was put back first."""


def check_cuda_graph(mode: str, device: torch.device) -> None:
    """Refuse ``cuda_graph = on`` where it cannot be had, before anything is built or written."""
    if mode != "on":
        return
    if device.type != "cuda":
        raise UserError(f"cuda_graph = on needs CUDA, and this run is on {device.type} (no CUDA device is "
                        f"visible); set cuda_graph = auto (eager without CUDA) or off")
    if distributed.is_distributed():
        raise UserError(f"cuda_graph = on is not available under torchrun ({distributed.world_size()} processes "
                        f"run eager); set cuda_graph = auto or off")


def eager_reason(mode: str, device: torch.device) -> str | None:
    """Why this run is eager whatever the self-check says, as ``summary.json`` records it; None if it may graph."""
    if mode == "off":
        return "eager: cuda_graph = off"
    if device.type != "cuda":
        return "eager: no CUDA device"
    if distributed.is_distributed():
        return (f"eager: torchrun ({distributed.world_size()} processes; DDP's gradient hooks are not captured "
                f"here)")
    return None


class GraphedStep:
    """``trainer.step`` replayed from CUDA graphs: call it as the step, ``graphed(train_student)``.

    ``on_failure(error, train_student)``, if given, computes an iteration whose capture failed (and decides what
    comes next); without it the error propagates.
    """

    def __init__(self, trainer, warmup: int = WARMUP_ITERATIONS, on_failure=None):
        if trainer.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {trainer.device}")
        self.trainer, self.warmup, self.on_failure = trainer, warmup, on_failure
        self.stream = torch.cuda.Stream(trainer.device)  # warm-up and capture, as torch's whole-network example
        self.tracked = [m for m in trainer.student.modules() if getattr(m, "tracks_ranges", False)]
        self.kind = None
        self.graph = self.output = None
        self.eager_done = 0
        self.captures = 0
        self.tensors: list[torch.Tensor] = []
        self.addresses: list[int] = []

    def __call__(self, train_student: bool = True) -> torch.Tensor:
        kind = (train_student, any(m.tracking for m in self.tracked))
        if kind != self.kind:
            self.release()
            self.kind = kind
        elif self.graph is not None and [t.data_ptr() for t in self.tensors] != self.addresses:
            # Something outside the step moved a parameter or a state (``param.data = ...``): capture anew.
            logger.warning("cuda_graph: a tensor the graph reads has moved; capturing again")
            self.release()
        if self.graph is None:
            if self.eager_done < self.warmup:
                self.eager_done += 1
                return self._eager(train_student)
            try:
                self._capture(train_student)
            except Exception as error:  # a capture that fails leaves the run as it was: nothing ran
                self.release()
                if self.on_failure is None:
                    raise
                return self.on_failure(error, train_student)
        self.graph.replay()
        return self.output.clone()

    def _eager(self, train_student: bool) -> torch.Tensor:
        main = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            values = self.trainer.step(train_student)
        main.wait_stream(self.stream)
        return values

    def _capture(self, train_student: bool) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.trainer.noise)  # before capture begins: each replay draws anew
        # thread_local: the evaluation loader's threads may still touch CUDA while the step is captured
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            output = self.trainer.step(train_student)
        self.graph, self.output = graph, output
        self.tensors = _graph_tensors(self.trainer)
        self.addresses = [t.data_ptr() for t in self.tensors]
        self.captures += 1

    def release(self) -> None:
        """Drop the graph (a later call warms up and captures again) and the gradients in its memory pool."""
        if self.graph is not None:
            for param in (*self.trainer.student_params, *self.trainer.generator_params):
                param.grad = None
        self.graph = self.output = None
        self.eager_done = 0
        self.tensors, self.addresses = [], []


def _optimizers(trainer) -> list[torch.optim.Optimizer]:
    """The student's optimizer and, where there is a generator, the generator's."""
    return [opt for opt in (trainer.opt_S, trainer.opt_G) if opt is not None]


def _graph_tensors(trainer) -> list[torch.Tensor]:
    """The tensors whose memory a captured step reads and writes outside its pool: modules, optimizer states,
    learning rates and the progress."""
    modules = [m for m in (trainer.student, trainer.generator, trainer.teacher) if m is not None]
    tensors = [tensor for module in modules for tensor in module.state_dict(keep_vars=True).values()]
    if trainer.pool is not None:
        tensors += [trainer.pool.images, trainer.pool.labels]
    for optimizer in _optimizers(trainer):
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += [g["lr"] for g in optimizer.param_groups if isinstance(g["lr"], torch.Tensor)]
    if trainer.progress_tensor is not None:
        tensors.append(trainer.progress_tensor)
    return tensors


# ------------------------------------------------------------------------------------------- self-check
def iteration_kinds(trainer) -> list[tuple[int, bool, bool]]:
    """(first epoch, trains the student, tracks ranges) of each kind of iteration in the epochs left."""
    o = trainer.options
    tracked = has_tracked_ranges(trainer.student)
    kinds: dict[tuple[bool, bool], int] = {}
    for epoch in range(trainer.epoch, o.nEpochs):
        kinds.setdefault((epoch >= o.warmup_epochs, tracked and epoch < o.act_range_epochs), epoch)
    return [(epoch, *kind) for kind, epoch in kinds.items()]


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def snapshot(trainer) -> dict:
    """Copies of everything an iteration changes: student, generator, both optimizers, the random states, the
    position in training and the epoch's recorded values."""
    rng = capture_rng(trainer.device, trainer.noise)
    return _clone({"student": trainer.student.state_dict(), "generator": state_of(trainer.generator),
                   "opt_S": trainer.opt_S.state_dict(), "opt_G": state_of(trainer.opt_G),
                   "rng": {key: rng[key] for key in ("torch", "cuda", "noise") if key in rng},
                   "position": [trainer.epoch, trainer.iteration], "history": trainer.history})


def restore(trainer, state: dict) -> None:
    """Put ``trainer`` back where :func:`snapshot` found it (modules copied in place; optimizers never share
    memory with ``state``, which may be restored again)."""
    state = _clone(state)
    trainer.student.load_state_dict(state["student"])
    if trainer.generator is not None:
        trainer.generator.load_state_dict(state["generator"])
    load_optimizer_state(trainer.opt_S, state["opt_S"])
    if trainer.opt_G is not None:
        load_optimizer_state(trainer.opt_G, state["opt_G"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], trainer.device)
    trainer.noise.set_state(rng["noise"])
    trainer.epoch, trainer.iteration = state["position"]
    trainer.history = state["history"]


def _scale_learning_rates(trainer, factor: float) -> None:
    for optimizer in _optimizers(trainer):
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
    :class:`GraphedStep`, or any stand-in for ``trainer.step``) from the same saved state, for each kind of
    :func:`iteration_kinds`; each line names the kind. The trainer is put back as it was in every case."""
    saved = snapshot(trainer)
    differences = []
    try:
        for epoch, train_student, tracking in kinds if kinds is not None else iteration_kinds(trainer):
            label = f"{'student step' if train_student else 'warm-up'}{', tracking ranges' if tracking else ''}"
            expected = run_iterations(trainer, trainer.step, epoch, train_student, tracking, count)
            restore(trainer, saved)
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
                raise CaptureError(f"{label}: {_first_line(failure)}") from failure
            differences += [f"{label}: {line}" for line in compare_states(saved, expected, actual, tolerance)]
    finally:
        restore(trainer, saved)
    return differences


def use_cuda_graphs(trainer, mode: str) -> str:
    """Decide how ``trainer`` runs its iterations and set ``trainer.graphed_step``; return (and record in
    ``trainer.meta["cuda_graph"]``, which the summary holds) ``"graphed"`` or ``"eager: WHY"``.

    ``on`` raises :class:`UserError` where ``auto`` falls back to eager with one warning."""
    reason = eager_reason(mode, trainer.device)
    kinds = iteration_kinds(trainer) if reason is None else []
    if reason is None and not kinds:
        reason = "eager: no training iterations left"
    if reason is None:
        tolerance = 0.0 if trainer.options.deterministic else TOLERANCE
        try:
            differences = self_check(trainer, lambda: GraphedStep(trainer), kinds, tolerance=tolerance)
            failure = (f"self-check differed ({'; '.join(differences[:3])}"
                       f"{f'; {len(differences) - 3} more' if len(differences) > 3 else ''})" if differences else None)
        except CaptureError as error:  # capture refused: an operation the graph cannot hold
            failure = f"capture failed ({error})"
        if failure is not None:
            _refuse_or_warn(mode, failure)
            reason = f"eager: {failure}"
        else:
            logger.info("cuda_graph: graphed; %d kind(s) of iteration checked against eager (%s)", len(kinds),
                        "bit for bit" if tolerance == 0 else f"tolerance {tolerance:g}")
    trainer.meta["cuda_graph"] = reason or "graphed"
    trainer.graphed_step = None if reason else GraphedStep(trainer, on_failure=_fall_back(trainer, mode))
    return trainer.meta["cuda_graph"]


def _refuse_or_warn(mode: str, failure: str) -> None:
    if mode == "on":
        raise UserError(f"cuda_graph = on: {failure}; set cuda_graph = auto to fall back to eager, or off")
    logger.warning("cuda_graph = %s: %s; training runs eager", mode, failure)


def _fall_back(trainer, mode: str):
    """What a capture that fails in the middle of a run does: stop (``on``), or run eager from here on."""
    def fall_back(error: Exception, train_student: bool) -> torch.Tensor:
        failure = f"capture failed at epoch {trainer.epoch + 1} ({_first_line(error)})"
        _refuse_or_warn(mode, failure)
        trainer.meta["cuda_graph"] = f"eager: {failure}"
        trainer.graphed_step = None
        return trainer.step(train_student)
    return fall_back


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
