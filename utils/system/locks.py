"""File locks for what concurrent processes share: a download into a cache or data folder, and a cell of a plan.

Every lock is a ``filelock.FileLock`` on a file beside what it guards (``flock`` on Linux and macOS,
``LockFileEx`` on Windows). The operating system releases it when the holding process ends, however it
ends, so a crash never leaves a stale lock behind; the empty ``.lock`` files stay, and may be deleted
whenever nothing runs.
"""

from __future__ import annotations

import contextlib
import logging
import os

from filelock import FileLock, Timeout

from . import distributed

__all__ = ["CELL_LOCK", "PROBE_WAIT_S", "fetch_lock", "fetching", "held_elsewhere", "lock_fd", "try_lock"]

logger = logging.getLogger("granq")

CELL_LOCK = "cell.lock"  # in a cell's folder, held while a run of that cell is going on
# A lock can be held for a moment by a process that only looks (held_elsewhere, or a claim that then finds the
# cell done): waiting this long before taking it for held keeps two such looks from hiding a cell from both.
PROBE_WAIT_S = 0.5


@contextlib.contextmanager
def fetch_lock(target: str):
    """Hold ``target + ".lock"`` while the ``with`` block fetches ``target`` (a file or a folder), so that
    processes fetching the same thing at once take turns: the first downloads, the others then find it.

    A folder where the lock file cannot be created is one nothing can be downloaded into either: the block
    then runs without a lock (the files must already be there).
    """
    path = f"{target}.lock"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process to fetch %s (lock %s)", target, path)
            lock.acquire()
    except OSError as error:  # a read-only folder or file system
        logger.debug("no lock for %s (%s): fetching without one", target, error)
        yield
        return
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def fetching(target: str):
    """:func:`fetch_lock` on ``target``, and under torchrun rank 0 first: the other ranks wait at a barrier
    until rank 0 has fetched it, then find the files. Call it on every rank."""
    with distributed.rank_zero_first(), fetch_lock(target):
        yield


def try_lock(path: str, timeout: float = 0) -> FileLock | None:
    """``path`` locked by this process (its folder created), or None when another process still holds it after
    ``timeout`` seconds."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        return None
    return lock


def held_elsewhere(path: str, wait: float = PROBE_WAIT_S) -> bool:
    """Whether another process holds the lock ``path`` (still after ``wait`` seconds); False when the file does
    not exist."""
    if not os.path.exists(path):
        return False
    lock = try_lock(path, wait)
    if lock is None:
        return True
    lock.release()
    return False


def lock_fd(lock: FileLock) -> int | None:
    """A new descriptor of the open file through which ``lock`` is held (close it once it has been handed on), or
    None where this filelock version keeps that file out of reach. A child process that inherits it holds the
    lock with its parent: the lock is free only once both have ended (``flock`` belongs to the open file, not
    to a process). A copy, because filelock closes its own descriptor in forked children."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    return os.dup(fd) if fd is not None else None
