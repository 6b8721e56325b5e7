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
against eager ones from the same saved state (:mod:`.graph_check`): bit for bit with ``deterministic = true``,
within :data:`TOLERANCE` otherwise. A difference or a capture error falls back to eager (``auto``, one warning) or
stops (``on``). Under torchrun the run is eager (DDP's reducer is not captured here). Only a run that may capture
builds its optimizers for capture (fused, learning rates in device tensors, :func:`.optim.build_optimizers`); an
eager run, or one that falls back, uses those of eager CUDA runs.

A capture that fails leaves the process usable: the thread returns to its stream, the training noise continues
from a fresh generator with the state it had, and no further capture is made in the process.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..system import distributed
from ..system.errors import UserError
from .graph_check import (
    CHECK_ITERATIONS,
    TOLERANCE,
    WARMUP_ITERATIONS,
    CaptureError,
    compare_states,
    first_line,
    iteration_kinds,
    restore,
    run_iterations,
    self_check,
    snapshot,
)

__all__ = ["CHECK_ITERATIONS", "CUDA_GRAPH_MODES", "TOLERANCE", "WARMUP_ITERATIONS", "CaptureError", "CudaCalls",
           "GraphedStep", "capture_failed", "check_cuda_graph", "compare_states", "eager_reason", "iteration_kinds",
           "may_capture", "restore", "run_iterations", "self_check", "snapshot", "use_cuda_graphs"]

logger = logging.getLogger("granq")

CUDA_GRAPH_MODES = ("auto", "on", "off")


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
    if _failed_capture is not None:
        return f"eager: a CUDA graph capture failed earlier in this process ({_failed_capture})"
    return None


def may_capture(mode: str, device: torch.device) -> bool:
    """Whether a run with ``cuda_graph = mode`` on ``device`` may capture its iterations (and so builds its
    optimizers for capture, :func:`.optim.build_optimizers`)."""
    return eager_reason(mode, device) is None


# A capture that fails can leave torch's capture state behind (the allocator's pool, a generator in capture mode):
# after one, this process makes no further capture. Holds the first line of that failure.
_failed_capture: str | None = None


def capture_failed() -> str | None:
    """The failure of a capture earlier in this process, if any (no further capture is made then)."""
    return _failed_capture


class CudaCalls:
    """The torch.cuda calls :class:`GraphedStep` makes, in one place, so that CPU tests can stand in for them."""

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")

    def new_stream(self, device):
        return torch.cuda.Stream(device)

    def current_stream(self, device):
        return torch.cuda.current_stream(device)

    def set_stream(self, stream) -> None:
        torch.cuda.set_stream(stream)

    def on_stream(self, stream):
        return torch.cuda.stream(stream)

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, stream):
        # thread_local: the evaluation loader's threads may still touch CUDA while the step is captured
        return torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")


CUDA = CudaCalls()


@contextlib.contextmanager
def _stale_streams_overridden():
    """torch's override of stale streams met by autograd during a capture (where this torch has it), on for the
    capture and put back after it: an AccumulateGrad node made on another stream then joins the capture."""
    getter = getattr(torch._C, "_override_stale_capture_stream", None)
    setter = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    if setter is None:
        yield
        return
    previous = bool(getter()) if getter is not None else False
    setter(True)
    try:
        yield
    finally:
        setter(previous)


class GraphedStep:
    """``trainer.step`` replayed from CUDA graphs: call it as the step, ``graphed(train_student)``.

    ``on_failure(error, train_student)``, if given, computes an iteration whose capture failed (and decides what
    comes next); without it the error propagates. Either way the process is left usable (:meth:`_capture`).
    """

    def __init__(self, trainer, warmup: int = WARMUP_ITERATIONS, on_failure=None):
        CUDA.check_device(trainer.device)
        self.trainer, self.warmup, self.on_failure = trainer, warmup, on_failure
        self.stream = CUDA.new_stream(trainer.device)  # warm-up and capture, as torch's whole-network example
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
            except Exception as error:  # nothing of the iteration ran: the trainer is as it was before it
                self.release()
                if self.on_failure is None:
                    raise
                return self.on_failure(error, train_student)
        self.graph.replay()
        return self.output.clone()

    def _eager(self, train_student: bool) -> torch.Tensor:
        main = CUDA.current_stream(self.trainer.device)
        self.stream.wait_stream(main)
        with CUDA.on_stream(self.stream):
            values = self.trainer.step(train_student)
        main.wait_stream(self.stream)
        return values

    def _capture(self, train_student: bool) -> None:
        """Capture one iteration. Whatever raises, the thread is back on the stream it was on; after a failure
        the trainer draws its noise from a fresh generator with the state it had before the capture (the
        registered one may be left in capture mode) and no further capture is made in this process."""
        global _failed_capture
        trainer = self.trainer
        main = CUDA.current_stream(trainer.device)
        noise_state = trainer.noise.get_state()
        graph = CUDA.new_graph()
        if hasattr(graph, "register_generator_state"):  # torch registers generators by itself where it lacks this
            graph.register_generator_state(trainer.noise)  # before capture begins: each replay draws anew
        try:
            with _stale_streams_overridden(), CUDA.capture(graph, self.stream):
                output = trainer.step(train_student)
        except Exception as error:
            _failed_capture = first_line(error)
            fresh = torch.Generator(device=trainer.device)
            fresh.set_state(noise_state)
            trainer.noise = fresh
            raise
        finally:
            CUDA.set_stream(main)  # torch.cuda.graph leaves the side stream only after a capture_end that succeeded
        self.graph, self.output = graph, output
        self.tensors = _graph_tensors(trainer)
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


def _graph_tensors(trainer) -> list[torch.Tensor]:
    """The tensors whose memory a captured step reads and writes outside its pool: modules, optimizer states,
    learning rates, the progress and a pool's images."""
    modules = [m for m in (trainer.student, trainer.generator, trainer.teacher) if m is not None]
    tensors = [tensor for module in modules for tensor in module.state_dict(keep_vars=True).values()]
    if trainer.pool is not None:  # read in place by the draws
        tensors += [trainer.pool.images, trainer.pool.labels]
    for optimizer in filter(None, (trainer.opt_S, trainer.opt_G)):
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += [g["lr"] for g in optimizer.param_groups if isinstance(g["lr"], torch.Tensor)]
    if trainer.progress_tensor is not None:
        tensors.append(trainer.progress_tensor)
    return tensors


def use_cuda_graphs(trainer, mode: str) -> str:
    """Decide how ``trainer`` runs its iterations and set ``trainer.graphed_step``; return (and record in
    ``trainer.meta["cuda_graph"]``, which the summary holds) ``"graphed"`` or ``"eager: WHY"``.

    ``on`` raises :class:`UserError` where ``auto`` falls back to eager with one warning."""
    reason = eager_reason(mode, trainer.device)
    if reason is not None and mode == "on":  # a capture that failed earlier; the others are refused at start-up
        _refuse_or_warn(mode, reason.removeprefix("eager: "))
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
    if reason:
        _go_eager(trainer)
    else:
        trainer.graphed_step = GraphedStep(trainer, on_failure=_fall_back(trainer, mode))
    return trainer.meta["cuda_graph"]


def _go_eager(trainer) -> None:
    """Eager iterations from here on, with the optimizers of eager runs (fused ones with tensor learning rates
    only serve a capture)."""
    trainer.graphed_step = None
    if trainer.capturable:
        trainer.use_capturable(False)


def _refuse_or_warn(mode: str, failure: str) -> None:
    if mode == "on":
        raise UserError(f"cuda_graph = on: {failure}; set cuda_graph = auto to fall back to eager, or off")
    logger.warning("cuda_graph = %s: %s; training runs eager", mode, failure)


def _fall_back(trainer, mode: str):
    """What a capture that fails in the middle of a run does: stop (``on``), or run eager from here on."""
    def fall_back(error: Exception, train_student: bool) -> torch.Tensor:
        failure = f"capture failed at epoch {trainer.epoch + 1} ({first_line(error)})"
        _refuse_or_warn(mode, failure)
        trainer.meta["cuda_graph"] = f"eager: {failure}"
        _go_eager(trainer)
        return trainer.step(train_student)
    return fall_back
