"""What a training iteration changes, owned in one place: :class:`TrainingState`.

Checkpoints (``checkpoint.pt``, :mod:`.checkpoints`) and the CUDA-graph self-check (:mod:`.graphs`) both save and
restore a trainer through it, so a new piece of state is added here once and both follow.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..system import distributed
from ..system.errors import UserError
from .checkpoints import RunFileError
from .optim import load_optimizer_state

__all__ = ["RUN_STATE", "TrainingState", "capture_rng", "clone_state", "restore_rng"]

# Trainer attributes kept as they are: the position (the next epoch, and the next iteration within it), the
# accuracies so far, the per-epoch records and the training time.
RUN_STATE = ("epoch", "iteration", "best_top1", "best_top5", "last_top1", "last_top5", "teacher_top1",
             "teacher_top5", "metrics", "elapsed")
MODULES = ("student", "generator")
OPTIMIZERS = ("opt_S", "opt_G")


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


class TrainingState:
    """Everything a training iteration of ``trainer`` changes, as one state dict.

    - the student and the generator: parameters and buffers (BatchNorm statistics, activation-range trackers);
    - both optimizers;
    - the random states: torch's, Python's, NumPy's, the device's and the training noise generator's, one entry
      per process under torchrun;
    - the position in training, the epoch's recorded values (``history``) and the records so far (:data:`RUN_STATE`).

    A trainer without a generator (or its optimizer) leaves that entry out. :meth:`state_dict` returns references
    to the live tensors, as ``nn.Module.state_dict`` does: copy it to keep it across iterations.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def _parts(self, names) -> dict:
        return {name: getattr(self.trainer, name) for name in names if getattr(self.trainer, name, None) is not None}

    def state_dict(self) -> dict:
        """The state; gathers every process's random states, so under torchrun every process must call it."""
        t = self.trainer
        state = {name: part.state_dict() for name, part in self._parts(MODULES + OPTIMIZERS).items()}
        state["history"] = None if t.history is None else t.history.cpu()
        state["rng"] = distributed.all_gather_objects(capture_rng(t.device, t.noise))  # one entry per process
        state.update({key: getattr(t, key) for key in RUN_STATE})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Put the trainer where :meth:`state_dict` found it. Module tensors are copied in place; buffers take their
        saved shape (ranges still empty when the state was saved are empty again); optimizers keep how they compute
        (:func:`.optim.load_optimizer_state`) and may share memory with ``state``."""
        t = self.trainer
        rng = state["rng"]
        if len(rng) != distributed.world_size():
            raise UserError(f"the checkpoint was written by {len(rng)} process(es); resume it with as many "
                            f"(this run has {distributed.world_size()})")
        history, names = state["history"], t.loss_names
        if history is not None and history.shape[1] != len(names):
            raise UserError(f"the checkpoint was written in the middle of an epoch with {history.shape[1]} recorded "
                            f"values per iteration, and this run records {len(names)} ({', '.join(names)}): resume "
                            f"it with the code and student_losses that wrote it")
        held = [name for name in MODULES + OPTIMIZERS if getattr(t, name, None) is not None]
        if any((name in state) != (name in held) for name in MODULES + OPTIMIZERS):
            raise UserError(f"the checkpoint holds {', '.join(n for n in MODULES + OPTIMIZERS if n in state)} and this "
                            f"run trains {', '.join(held)}: resume it with the image_source that wrote it")
        for name, module in self._parts(MODULES).items():
            module.load_state_dict(state[name])
        for name, optimizer in self._parts(OPTIMIZERS).items():
            load_optimizer_state(optimizer, state[name])
        for key in RUN_STATE:
            setattr(t, key, state[key])
        t.history = None if history is None else history.to(t.device)
        restore_rng(rng[distributed.rank()], t.device, t.noise)


def clone_state(value):
    """A deep copy of a state (tensors cloned, containers rebuilt), sharing no memory with ``value``."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: clone_state(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return value
