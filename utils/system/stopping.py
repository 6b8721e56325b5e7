"""Stopping a run cleanly: SIGINT, SIGTERM or SIGHUP set a flag, the trainer checkpoints at the next agreed point."""

import contextlib
import logging
import signal

import torch
import torch.distributed as dist

from . import distributed

__all__ = ["STOP_SIGNALS", "RunInterrupted", "StopRequest"]

# SIGTERM is what SLURM and most schedulers send before they kill a job; SIGHUP comes when the terminal closes.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

logger = logging.getLogger("granq")


class RunInterrupted(Exception):
    """A stop was requested; a checkpoint was written. ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Whether a stop was requested, by a signal (while :meth:`handling_signals`) or by :meth:`request`.

    The first of :data:`STOP_SIGNALS` asks the trainer to finish its step and write a checkpoint; a second one
    stops at once with KeyboardInterrupt.
    """

    def __init__(self):
        self.signum: int | None = None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if ``signum`` had arrived (also for tests and embedding code)."""
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        logger.warning("%s received: finishing the current step, then writing a checkpoint",
                       signal.Signals(signum).name)
        self.signum = signum

    @contextlib.contextmanager
    def handling_signals(self):
        """Route :data:`STOP_SIGNALS` to :meth:`request` inside the ``with`` block."""
        previous = {s: signal.signal(s, lambda signum, frame: self.request(signum)) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop; collective under torchrun, so call it on every rank."""
        if not distributed.is_distributed():
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], device=device)
        signum = int(distributed.all_reduce(flag, dist.ReduceOp.MAX).item())
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
