"""The files a run writes that hold tensors: their names, layout, format version, saving and loading.

A run directory holds ``checkpoint.pt`` (everything needed to resume, after every epoch and on
interruption) and ``best_student.pt`` (the student with the best top-1 so far). Both are dicts with
``format``, ``options`` (the resolved config as a dict), ``meta`` (id, seed, teacher weights source, ...)
and ``student`` (its state dict); ``checkpoint.pt`` adds the generator and both optimizers (a run on a pool has
neither the generator nor its optimizer), the position in training, the metrics so far and every rank's random
states. All of them, and ``summary.json``, are written atomically (:mod:`utils.system.files`): a reader never sees
half a file, and a failed write leaves none.
"""

from __future__ import annotations

import os
import sys

import torch

from ..system import distributed
from ..system.errors import UserError
from ..system.files import WriteError, atomic_save, atomic_save_json

__all__ = ["BEST_STUDENT", "CHECKPOINT", "FORMAT", "RunFileError", "atomic_save", "atomic_save_json",
           "find_checkpoint", "find_student_file", "load_run_file", "run_summary", "save_best_student",
           "save_run_file", "student_record"]

CHECKPOINT = "checkpoint.pt"
BEST_STUDENT = "best_student.pt"
FORMAT = 1  # bump when the layout changes in a way older code cannot read
SUPPORTED_FORMATS = (1,)


class RunFileError(UserError):
    """A file or directory that does not hold what this code can read."""


def student_record(options: dict, meta: dict, student_state: dict, **fields) -> dict:
    """The common layout of both files: format, options, meta and the student, plus ``fields``."""
    return {"format": FORMAT, "options": options, "meta": meta, "student": student_state, **fields}


def save_best_student(trainer, epochs_done: int) -> None:
    """Write ``best_student.pt``: ``trainer``'s student as it is now, its best top-1/top-5 and its epochs done."""
    record = student_record(trainer.options.to_dict(), trainer.meta, trainer.student.state_dict(),
                            epoch=epochs_done, top1=trainer.best_top1, top5=trainer.best_top5)
    save_run_file(record, os.path.join(trainer.run_dir, BEST_STUDENT), trainer.run_dir)


def save_run_file(record, path: str, run_dir: str, write=atomic_save) -> None:
    """Write ``record`` to ``path`` atomically with ``write`` (:func:`atomic_save`, :func:`atomic_save_json`).

    A failed write (a full disk) is one :class:`WriteError` that also says what is left and how to go on: the
    previous file is intact, and the run resumes from its checkpoint."""
    try:
        write(record, path)
    except WriteError as error:
        name = os.path.basename(path)
        kept = f"the previous {name} is intact" if os.path.exists(path) else f"no {name} was written before"
        checkpoint = os.path.join(run_dir, CHECKPOINT)
        resume = (f"free some space, then resume with: python {sys.argv[0]} --resume {run_dir}"
                  if os.path.exists(checkpoint) else "free some space and start the run again")
        raise WriteError(f"{error}; {kept}; {resume}", error.path, error.needed, error.free) from None


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


def run_summary(trainer) -> dict:
    """What ``summary.json`` records of ``trainer``'s run: accuracies, the student's spec (its dict's keys at the
    top level), the network and the training length, the metadata."""
    o = trainer.options
    return {
        "teacher_top1": trainer.teacher_top1, "teacher_top5": trainer.teacher_top5,
        "student_top1": trainer.last_top1, "student_top5": trainer.last_top5,
        "best_top1": trainer.best_top1, "best_top5": trainer.best_top5, "epochs": trainer.epoch,
        **o.student_spec().to_dict(), "network": o.network, "dataset": o.dataset, "batchSize": o.batchSize,
        "iters_per_epoch": o.iters_per_epoch, "image_source": o.image_source,
        "world_size": distributed.world_size(),
        **trainer.meta,
        "seconds": round(trainer.elapsed, 3),
        "run_dir": os.path.abspath(trainer.run_dir),
    }
