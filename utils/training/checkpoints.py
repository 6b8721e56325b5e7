"""The files a run writes that hold tensors: their names, layout, format version, saving and loading.

A run directory holds ``checkpoint.pt`` (everything needed to resume, after every epoch and on
interruption) and ``best_student.pt`` (the student with the best top-1 so far). Both are dicts with
``format``, ``options`` (the resolved config as a dict), ``meta`` (id, seed, teacher weights source, ...)
and ``student`` (its state dict); ``checkpoint.pt`` adds the generator, both optimizers, the position in
training, the metrics so far and every rank's random states. All of them, and ``summary.json``, are written
atomically (:mod:`utils.system.files`): a reader never sees half a file, and a failed write leaves none.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from ..system import distributed
from ..system.errors import UserError
from ..system.files import WriteError, atomic_save, atomic_save_json
from .optim import load_optimizer_state

__all__ = ["BEST_STUDENT", "CHECKPOINT", "FORMAT", "RunFileError", "atomic_save", "atomic_save_json", "capture_rng",
           "find_checkpoint", "find_student_file", "load_run_file", "restore_rng", "restore_trainer", "run_summary",
           "save_run_file", "student_record", "trainer_state"]

CHECKPOINT = "checkpoint.pt"
BEST_STUDENT = "best_student.pt"
FORMAT = 1  # bump when the layout changes in a way older code cannot read
SUPPORTED_FORMATS = (1,)
# Trainer attributes saved in checkpoint.pt as they are.
RUN_STATE = ("epoch", "iteration", "best_top1", "best_top5", "last_top1", "last_top5", "teacher_top1",
             "teacher_top5", "metrics", "elapsed")


class RunFileError(UserError):
    """A file or directory that does not hold what this code can read."""


def student_record(options: dict, meta: dict, student_state: dict, **fields) -> dict:
    """The common layout of both files: format, options, meta and the student, plus ``fields``."""
    return {"format": FORMAT, "options": options, "meta": meta, "student": student_state, **fields}


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


def trainer_state(trainer) -> dict:
    """What ``checkpoint.pt`` holds of ``trainer``: enough for :func:`restore_trainer` to continue exactly.
    Gathers every rank's random states, so every rank must call it."""
    return student_record(
        trainer.options.to_dict(), trainer.meta, trainer.student.state_dict(),
        generator=trainer.generator.state_dict(), opt_S=trainer.opt_S.state_dict(), opt_G=trainer.opt_G.state_dict(),
        history=None if trainer.history is None else trainer.history.cpu(),
        rng=distributed.all_gather_objects(capture_rng(trainer.device, trainer.noise)),  # one entry per rank
        **{key: getattr(trainer, key) for key in RUN_STATE})


def restore_trainer(trainer, state: dict) -> None:
    """Put ``trainer`` where :func:`trainer_state` found it: modules, optimizers, position, random states."""
    rng = state["rng"]
    if len(rng) != distributed.world_size():
        raise UserError(f"the checkpoint was written by {len(rng)} process(es); resume it with as many "
                        f"(this run has {distributed.world_size()})")
    trainer.student.load_state_dict(state["student"])
    trainer.generator.load_state_dict(state["generator"])
    load_optimizer_state(trainer.opt_S, state["opt_S"])
    load_optimizer_state(trainer.opt_G, state["opt_G"])
    for key in RUN_STATE:
        setattr(trainer, key, state[key])
    history, names = state["history"], trainer.loss_names
    if history is not None and history.shape[1] != len(names):
        raise UserError(f"the checkpoint was written in the middle of an epoch with {history.shape[1]} recorded "
                        f"values per iteration, and this run records {len(names)} ({', '.join(names)}): resume it "
                        f"with the code and student_losses that wrote it")
    trainer.history = None if history is None else history.to(trainer.device)
    restore_rng(rng[distributed.rank()], trainer.device, trainer.noise)


def run_summary(trainer) -> dict:
    """What ``summary.json`` records of ``trainer``'s run: accuracies, the student's spec (its dict's keys at the
    top level), the network and the training length, the metadata."""
    o = trainer.options
    return {
        "teacher_top1": trainer.teacher_top1, "teacher_top5": trainer.teacher_top5,
        "student_top1": trainer.last_top1, "student_top5": trainer.last_top5,
        "best_top1": trainer.best_top1, "best_top5": trainer.best_top5, "epochs": trainer.epoch,
        **o.student_spec().to_dict(), "network": o.network, "dataset": o.dataset, "batchSize": o.batchSize,
        "iters_per_epoch": o.iters_per_epoch,
        "world_size": distributed.world_size(),
        **trainer.meta,
        "seconds": round(trainer.elapsed, 3),
        "run_dir": os.path.abspath(trainer.run_dir),
    }
