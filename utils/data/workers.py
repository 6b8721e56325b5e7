"""Loader worker processes: how many a process gets, and how they stop.

The workers ignore SIGINT, SIGTERM and SIGHUP (:func:`ignore_stop_signals`): a signal sent to a run's whole
process group (a terminal's Ctrl-C, SLURM's SIGTERM) then reaches them harmlessly, and the main process decides
when to stop; the workers end with it. Since SIGTERM no longer ends them, the loaders here (:class:`WorkerLoader`)
tell their workers to stop at interpreter exit, before multiprocessing would send SIGTERM and wait for them
forever, and kill those that have not stopped in time.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 (imported first, so that its exit handler runs after ours)
import os
import signal
import weakref

import torch
from torch.utils.data import DataLoader

from ..system import distributed
from ..system.stopping import STOP_SIGNALS

__all__ = ["WorkerLoader", "close_workers", "evaluation_workers", "ignore_stop_signals"]


def evaluation_workers(threads: int) -> int:
    """Loader workers of this process for ``nThreads = threads``: at most one per CPU, and under torchrun the
    machine's share of one rank (``threads // LOCAL_WORLD_SIZE``, at least 1 where ``threads`` > 0)."""
    if threads == 0:
        return 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.is_distributed() else 1
    return max(1, min(threads, os.cpu_count() or 1) // local_ranks)


def ignore_stop_signals(worker_id: int) -> None:
    """In each loader worker: ignore the stop signals (:data:`~utils.system.stopping.STOP_SIGNALS`)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class WorkerLoader(DataLoader):
    """A DataLoader whose workers ignore the stop signals, whose worker seeds come from a generator of its own
    (never from the global random stream), and whose workers are told to stop at interpreter exit."""

    def __init__(self, dataset, **kwargs):
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        if kwargs.get("num_workers", 0):
            kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        super().__init__(dataset, **kwargs)

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers:
            _ITERATORS.add(iterator)
            _WORKERS.update(getattr(iterator, "_workers", ()))
        return iterator


def close_workers(loader) -> None:
    """End the persistent workers of ``loader`` now; a later pass starts new ones."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def _end_all_workers() -> None:
    for iterator in list(_ITERATORS):
        iterator._shutdown_workers()
    # A worker that did not stop in time (torch then sends it SIGTERM, which it ignores) is killed here, where
    # multiprocessing would otherwise wait for it forever.
    for worker in list(_WORKERS):
        if worker.is_alive():
            worker.kill()
            worker.join()


# Every iterator with workers, persistent or not, finished or not (one left in a traceback keeps its workers),
# and every worker process they started (multiprocessing keeps those alive while the process runs).
_ITERATORS = weakref.WeakSet()
_WORKERS = weakref.WeakSet()
# atexit runs its handlers in reverse order: this one, registered after multiprocessing's, runs first.
atexit.register(_end_all_workers)
