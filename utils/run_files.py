"""The files a run writes that hold tensors: their names, layout, format version, saving and loading.

A run directory holds ``checkpoint.pt`` (everything needed to resume, after every epoch and on
interruption) and ``best_student.pt`` (the student with the best top-1 so far). Both are dicts with
``format``, ``options`` (the resolved config as a dict), ``meta`` (id, seed, teacher weights source, ...)
and ``student`` (its state dict); ``checkpoint.pt`` adds the generator, both optimizers, the position in
training, the metrics so far and every rank's random states. All of them, and ``summary.json``, are written
to a temporary file and then renamed, so that a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random

import numpy as np
import torch

from .errors import UserError

__all__ = ["BEST_STUDENT", "CHECKPOINT", "FORMAT", "RunFileError", "atomic_save", "atomic_save_json", "capture_rng",
           "find_checkpoint", "find_student_file", "load_run_file", "restore_rng", "student_record"]

CHECKPOINT = "checkpoint.pt"
BEST_STUDENT = "best_student.pt"
FORMAT = 1  # bump when the layout changes in a way older code cannot read
SUPPORTED_FORMATS = (1,)


class RunFileError(UserError):
    """A file or directory that does not hold what this code can read."""


def student_record(options: dict, meta: dict, student_state: dict, **fields) -> dict:
    """The common layout of both files: format, options, meta and the student, plus ``fields``."""
    return {"format": FORMAT, "options": options, "meta": meta, "student": student_state, **fields}


@contextlib.contextmanager
def _replacing(path: str):
    """A temporary path to write, renamed to ``path`` when the ``with`` block succeeds: a crash never leaves a
    broken file at ``path``, and a reader sees the old file or the new one."""
    tmp = f"{path}.tmp"
    yield tmp
    os.replace(tmp, path)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then rename."""
    with _replacing(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_json(obj, path: str) -> None:
    """``obj`` as indented JSON, written to a temporary file and then renamed (``summary.json``)."""
    with _replacing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def capture_rng(device: torch.device | None = None, noise: torch.Generator | None = None) -> dict:
    """This process's random states: torch's, Python's, NumPy's, the CUDA state of ``device`` (its own GPU,
    not every visible one) and the state of the training noise generator ``noise``."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if noise is not None:
        state["noise"] = noise.get_state()
    return state


def restore_rng(state: dict, device: torch.device | None = None, noise: torch.Generator | None = None) -> None:
    """Undo everything drawn since :func:`capture_rng` returned ``state``.

    The CUDA state goes to ``device`` whatever its index, so a run may resume on a machine with other GPUs
    visible. Files of earlier versions hold a list with one state per visible GPU: the entry of ``device``'s
    index is restored. A file without a ``noise`` state (written before the noise had its own stream) leaves
    ``noise`` as seeded.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):
        index = device.index or 0 if device is not None else 0
        if index >= len(cuda):
            raise RunFileError(f"the checkpoint holds the random states of {len(cuda)} GPU(s), none for GPU "
                               f"{index}; resume it on one of GPUs 0..{len(cuda) - 1}")
        cuda = cuda[index]
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    if noise is not None and "noise" in state:
        noise.set_state(state["noise"])


def find_checkpoint(run_dir: str) -> str:
    """``run_dir``'s ``checkpoint.pt``; a clear error when there is none."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise RunFileError(f"{run_dir!r} holds no {CHECKPOINT}; give the directory of a run that finished at least "
                           f"one epoch or was interrupted")
    return path


def find_student_file(path: str) -> str:
    """The file to load for ``path``: the file itself, or in a run directory its ``checkpoint.pt``.

    A run directory resolves to ``checkpoint.pt``, the student after the last finished epoch, whose
    accuracy is the run's recorded ``student_top1``; give ``best_student.pt`` explicitly for the best one.
    Runs without training (``nEpochs = 0``) write only ``best_student.pt``, which is then their last student.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise RunFileError(f"{path!r} is neither a checkpoint file nor a run directory")
    for name in (CHECKPOINT, BEST_STUDENT):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise RunFileError(f"run directory {path!r} holds neither {CHECKPOINT} nor {BEST_STUDENT}; "
                       f"the run has not finished an epoch")


def load_run_file(path: str, map_location="cpu", require=("options", "student")) -> dict:
    """Load a run file (``path``: a file, or a run directory as :func:`find_student_file` resolves it).

    The file is unpickled (``weights_only=False``): its options, metadata and random states are plain
    Python objects. Only load files you trust. ``require`` names the keys the caller needs.
    """
    file = find_student_file(path)
    try:
        record = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise RunFileError(f"{file!r} cannot be read as a PyTorch checkpoint ({error})") from None
    if not isinstance(record, dict) or not {"options", "student"} <= record.keys():
        raise RunFileError(f"{file!r} is not a student checkpoint of this project (no 'options' and 'student')")
    if record.get("format", 1) not in SUPPORTED_FORMATS:
        raise RunFileError(f"{file!r} has checkpoint format {record['format']!r}; this code reads "
                           f"format {', '.join(map(str, SUPPORTED_FORMATS))}")
    missing = [key for key in require if key not in record]
    if missing:
        raise RunFileError(f"{file!r} holds no {', '.join(missing)} ({BEST_STUDENT} holds only the student; "
                           f"use {CHECKPOINT})")
    return record
