"""Rebuild a trained fake-quantized student from a saved file alone, without the trainer.

A run writes two files that hold a student (``checkpoint.pt`` after every epoch, ``best_student.pt`` at
each new best top-1); both record the options it was trained with, so the architecture, bit-widths and
quantizer modes need not be given again.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .modules import ACT_MODES
from .quantize import quantize_model, set_act_tracking

__all__ = ["MODEL_KEYS", "CheckpointError", "load_quantized_model", "read_student_checkpoint", "rebuild_student",
           "resolve_student_checkpoint"]

# The options that define the student's architecture and quantizers; every other option only
# affects how it was trained or evaluated.
MODEL_KEYS = ("network", "qw", "qa", "act_mode", "weight_granularity")
SUPPORTED_FORMATS = (1,)


class CheckpointError(ValueError):
    """A file or directory that does not hold a student this code can rebuild."""


def _file_names() -> tuple[str, str]:
    # Local import: utils imports quantization_utils at module level, so the reverse must wait.
    from utils.trainer import BEST_STUDENT, CHECKPOINT

    return CHECKPOINT, BEST_STUDENT


def resolve_student_checkpoint(path: str) -> str:
    """The file to load for ``path``: the file itself, or in a run directory its ``checkpoint.pt``.

    A run directory resolves to ``checkpoint.pt``, the student after the last finished epoch, whose
    accuracy is the run's recorded ``student_top1``; give ``best_student.pt`` explicitly for the best one.
    Runs without training (``nEpochs = 0``) write only ``best_student.pt``, which is then their last student.
    """
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is neither a checkpoint file nor a run directory")
    for name in _file_names():
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"run directory {path!r} holds neither {' nor '.join(_file_names())}; "
                          f"the run has not finished an epoch")


def read_student_checkpoint(path: str, map_location="cpu") -> tuple[str, dict]:
    """Resolve ``path`` (file or run directory) and load it; return (file path, checkpoint dict).

    The file is unpickled (``weights_only=False``): its options, metadata and random states are plain
    Python objects. Only load files you trust.
    """
    file = resolve_student_checkpoint(path)
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{file!r} cannot be read as a PyTorch checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or not {"options", "student"} <= checkpoint.keys():
        raise CheckpointError(f"{file!r} is not a student checkpoint of this project (no 'options' and 'student')")
    if checkpoint.get("format", 1) not in SUPPORTED_FORMATS:
        raise CheckpointError(f"{file!r} has checkpoint format {checkpoint['format']!r}; this code reads "
                              f"format {', '.join(map(str, SUPPORTED_FORMATS))}")
    return file, checkpoint


def rebuild_student(checkpoint: dict) -> nn.Module:
    """The quantized student of a loaded checkpoint dict, weights loaded strictly, in eval mode, on the
    device of the saved tensors.

    The float architecture comes from the model registry (random initialisation, nothing downloaded),
    is quantized with the recorded ``qw``, ``qa``, ``act_mode`` and ``weight_granularity``, then gets the
    saved state. Layer-wise activation ranges are frozen, as the trainer freezes them for evaluation.
    """
    from utils.models import get_model_spec  # local import, see _file_names

    options = checkpoint["options"]
    missing = [key for key in MODEL_KEYS if key not in options]
    if missing:
        raise CheckpointError(f"the checkpoint's options lack {', '.join(missing)}; cannot rebuild the student")
    if options["act_mode"] not in ACT_MODES:
        raise CheckpointError(f"the checkpoint's act_mode {options['act_mode']!r} is not one of {ACT_MODES}")
    float_model = get_model_spec(options["network"]).build()
    student = quantize_model(float_model, options["qw"], options["qa"], options["act_mode"],
                             options["weight_granularity"])
    try:
        student.load_state_dict(checkpoint["student"])
    except RuntimeError as error:
        raise CheckpointError(f"the saved student does not fit {options['network']} quantized with "
                              f"{', '.join(f'{k}={options[k]}' for k in MODEL_KEYS[1:])}: {error}") from None
    set_act_tracking(student, False)
    # Where torch.load put the saved tensors (its map_location) is where the student should live.
    device = next(iter(checkpoint["student"].values())).device
    return student.to(device).eval()


def load_quantized_model(path: str, map_location="cpu") -> nn.Module:
    """Rebuild the quantized student saved at ``path`` (a ``.pt`` file or a run directory), in eval mode.

    A run directory gives its last student (``checkpoint.pt``); pass ``best_student.pt`` for the best.
    The model's tensors are on ``map_location``.
    """
    _, checkpoint = read_student_checkpoint(path, map_location)
    return rebuild_student(checkpoint)
