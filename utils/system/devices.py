"""Which device a process computes on, and the backend flags it computes with: one home for both.

:func:`cuda_device` turns a GPU index (the ``GPU`` key, or torchrun's ``LOCAL_RANK``) into a device and
refuses one that is not there. :func:`configure_backends` sets the flags that trade speed for
reproducibility (``deterministic``); :func:`backend_flags` reads back the ones in effect, for the summary.
"""

from __future__ import annotations

import itertools
import os

import torch

from .errors import UserError

__all__ = ["CUBLAS_WORKSPACE", "MIN_TORCH", "backend_flags", "check_torch", "configure_backends", "cuda_device",
           "set_tf32_settings", "tf32_settings"]

# cuBLAS is deterministic only with a fixed workspace (CUDA's documentation; torch checks the variable).
CUBLAS_WORKSPACE = ":4096:8"
# Where torch has the ``fp32_precision`` settings, TF32 is set and read through them only: torch warns about the
# legacy ``allow_tf32`` flags, and refuses to read them once the new settings were used.
_PRECISION_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")

# The oldest torch that has every API this code calls: torch.onnx.export's ``dynamo`` and ``optimize`` arguments
# (tools/export.py); training alone needs 2.4 (fused SGD with a tensor learning rate, torch.library.custom_op).
MIN_TORCH = (2, 6)


def check_torch(version: str | None = None) -> None:
    """Raise :class:`UserError` naming the release needed where ``version`` (this torch's) is older than
    :data:`MIN_TORCH`."""
    version = torch.__version__ if version is None else version
    numbers = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        numbers.append(int(digits) if digits else 0)
    if tuple(numbers) < MIN_TORCH:
        needed = ".".join(map(str, MIN_TORCH))
        raise UserError(f"this code needs torch {needed} or newer, and torch {version} is installed: "
                        f"pip install 'torch>={needed}' (or pip install -r requirements.txt)")



def tf32_settings() -> dict:
    """The TF32 settings as they are: ``fp32_precision`` strings, or the legacy booleans."""
    if _PRECISION_API:
        return {"conv": torch.backends.cudnn.conv.fp32_precision, "rnn": torch.backends.cudnn.rnn.fp32_precision,
                "matmul": torch.backends.cuda.matmul.fp32_precision}
    return {"conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}


def set_tf32_settings(settings: dict) -> None:
    """Set what :func:`tf32_settings` returned (tests restore the settings with it)."""
    if _PRECISION_API:
        torch.backends.cudnn.conv.fp32_precision = settings["conv"]
        torch.backends.cudnn.rnn.fp32_precision = settings["rnn"]
        torch.backends.cuda.matmul.fp32_precision = settings["matmul"]
    else:
        torch.backends.cudnn.allow_tf32 = settings["conv"]
        torch.backends.cuda.matmul.allow_tf32 = settings["matmul"]


def _allows_tf32(setting) -> bool:
    """Whether a setting of :func:`tf32_settings` lets TF32 be used; ``"none"`` inherits the global setting."""
    if isinstance(setting, bool):
        return setting
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting == "tf32"


# torch's own TF32 settings in this process before any run changed them: what ``deterministic = false`` keeps.
_DEFAULT_TF32 = tf32_settings()
_NO_TF32 = {key: "ieee" if _PRECISION_API else False for key in _DEFAULT_TF32}


def cuda_device(index: int, source: str) -> torch.device:
    """``cuda:index``, made the current device; a :class:`UserError` naming both numbers when there is no such GPU.

    ``source`` says where the index came from (``"GPU"`` or ``"LOCAL_RANK"``), for the message.
    """
    visible = torch.cuda.device_count()
    if not 0 <= index < visible:
        if source == "LOCAL_RANK":
            fix = f"start at most {visible} process(es) per machine (torchrun --nproc_per_node {visible})"
        else:
            fix = f"set GPU to one of 0..{visible - 1} (--set GPU=N), or change CUDA_VISIBLE_DEVICES"
        raise UserError(f"{source} = {index} but {visible} GPU(s) are visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); {fix}")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def configure_backends(deterministic: bool, device: torch.device) -> dict:
    """Set the flags of ``deterministic`` for this process; return :func:`backend_flags`.

    ``True``: deterministic algorithms only (``torch.use_deterministic_algorithms``; an operation without
    one raises), cuDNN without autotuning, no TF32 in convolutions or matrix products, and the cuBLAS
    workspace that makes it deterministic (``CUBLAS_WORKSPACE_CONFIG``, unless already set). Call it before
    the first CUDA computation: cuBLAS reads the variable when it starts.
    ``False``: cuDNN picks the fastest algorithm per shape (on CUDA), TF32 as torch's defaults, and the same
    ``--id`` can give different results from one CUDA run to the next.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    set_tf32_settings(_NO_TF32 if deterministic else _DEFAULT_TF32)
    return backend_flags(device)


def backend_flags(device: torch.device) -> dict:
    """The flags in effect for computations on ``device``: ``deterministic`` (deterministic algorithms only),
    ``cudnn_benchmark`` and ``tf32`` (``{"conv": bool, "matmul": bool}``: whether TF32 may be used there).

    On the CPU neither cuDNN nor TF32 is used, so both read false whatever the flags hold.
    """
    cuda = device.type == "cuda"
    tf32 = tf32_settings()
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": cuda and torch.backends.cudnn.benchmark,
        "tf32": {"conv": cuda and _allows_tf32(tf32["conv"]), "matmul": cuda and _allows_tf32(tf32["matmul"])},
    }


def resnet_memory_format(device: torch.device) -> torch.memory_format:
    """Layout of the teacher and the student during training: channels_last on the CPU, where oneDNN runs
    their convolutions faster (docs/speed.md; the generator gains nothing from it)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format
