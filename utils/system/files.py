"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a failed write leaves
no partial file behind.

The contents are made in memory first and then written to ``PATH.tmp``, which is renamed over ``PATH``. So a
full disk or any other OS error shows up as one :class:`WriteError` that names the file, the bytes it needed and
the bytes free, instead of an error from deep inside ``torch.save``'s writer.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil

import torch

from .errors import UserError

__all__ = ["CACHE_ENV", "WriteError", "atomic_save", "atomic_save_json", "atomic_write_bytes", "cache_directory"]

CACHE_ENV = "GRANQ_CACHE"  # where a cache setting of ``auto`` keeps its files, when set


class WriteError(UserError):
    """A file could not be written (a full disk, a read-only folder, ...); its partial file was removed."""

    def __init__(self, message: str, path: str = "", needed: int | None = None, free: int | None = None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free


def free_bytes(path: str) -> int | None:
    """Bytes free on the file system that holds ``path`` (a file or a folder), or None when unknown."""
    with contextlib.suppress(OSError):
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return None


def _write_error(path: str, error: OSError, needed: int) -> WriteError:
    free = free_bytes(path)
    reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    amounts = f"{needed:,} bytes needed" + (f", {free:,} free" if free is not None else "")
    return WriteError(f"cannot write {path}: {reason} ({amounts})", path, needed, free)


def atomic_write_bytes(data: bytes | memoryview, path: str) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` and a rename; on failure remove ``path.tmp``, leave ``path``
    as it was and raise :class:`WriteError`."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise _write_error(path, error, len(data)) from None
    except BaseException:  # interrupted: still no partial file
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path``, atomically (:func:`atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getbuffer(), path)


def atomic_save_json(obj, path: str) -> None:
    """``obj`` as indented JSON in ``path``, atomically (``summary.json``)."""
    atomic_write_bytes(json.dumps(obj, indent=2).encode(), path)


def cache_directory(setting: str, default: str) -> str | None:
    """The folder that a cache setting (``auto``, ``off`` or a directory) keeps its files in; None for ``off``.
    ``auto`` is ``$GRANQ_CACHE`` where it is set, else ``default``."""
    if setting == "off":
        return None
    if setting == "auto":
        setting = os.environ.get(CACHE_ENV) or default
    return os.path.abspath(os.path.expanduser(setting))
