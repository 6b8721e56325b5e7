"""Which device a process computes on, and the backend flags it computes with: one home for both.

:func:`cuda_device` turns a GPU index (the ``GPU`` key, or torchrun's ``LOCAL_RANK``) into a device and
refuses one that is not there. :func:`configure_backends` sets the flags that trade speed for
reproducibility (``deterministic``); :func:`backend_flags` reads back the ones in effect, for the summary.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError

__all__ = ["CUBLAS_WORKSPACE", "backend_flags", "configure_backends", "cuda_device"]

# cuBLAS is deterministic only with a fixed workspace (CUDA's documentation; torch checks the variable).
CUBLAS_WORKSPACE = ":4096:8"
# torch's own TF32 settings in this process before any run changed them: what ``deterministic = false`` keeps.
_DEFAULT_TF32 = {"conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}


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
    torch.backends.cudnn.allow_tf32 = _DEFAULT_TF32["conv"] and not deterministic
    torch.backends.cuda.matmul.allow_tf32 = _DEFAULT_TF32["matmul"] and not deterministic
    return backend_flags(device)


def backend_flags(device: torch.device) -> dict:
    """The flags in effect for computations on ``device``: ``deterministic`` (deterministic algorithms only),
    ``cudnn_benchmark`` and ``tf32`` (``{"conv": bool, "matmul": bool}``: whether TF32 may be used there).

    On the CPU neither cuDNN nor TF32 is used, so both read false whatever the flags hold.
    """
    cuda = device.type == "cuda"
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": cuda and torch.backends.cudnn.benchmark,
        "tf32": {"conv": cuda and torch.backends.cudnn.allow_tf32,
                 "matmul": cuda and torch.backends.cuda.matmul.allow_tf32},
    }
