"""Thin helpers over torch.distributed; every function also works in a single process."""

import contextlib
import hashlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .devices import cuda_device

__all__ = ["all_gather_objects", "all_reduce", "barrier", "broadcast_object", "init_from_env",
           "is_distributed", "rank", "rank_zero_first", "replica_checksums", "shutdown", "state_sha256", "world_size",
           "wrap"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(gpu: int = 0) -> torch.device:
    """Join the process group that torchrun describes in the environment; return this rank's device.

    NCCL when CUDA is available (one GPU per local rank), Gloo on CPU. Without torchrun (no
    WORLD_SIZE, or 1) nothing is initialised and the device is GPU ``gpu`` or the CPU. A GPU index or
    local rank without a GPU of that index is a :class:`~utils.system.errors.UserError`.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available():
        if distributed:
            device = cuda_device(int(os.environ.get("LOCAL_RANK", "0")), "LOCAL_RANK")
        else:
            device = cuda_device(gpu, "GPU")
    else:
        device = torch.device("cpu")
    if distributed and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    """Wait until every process gets here; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def state_sha256(module: torch.nn.Module) -> str:
    """The SHA-256 (hex) of the bytes of ``module``'s state, tensor after tensor in ``state_dict`` order."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def replica_checksums(module: torch.nn.Module) -> list[str]:
    """One short SHA-256 of ``module``'s state per rank (:func:`state_sha256`); raises if the replicas differ."""
    checksums = all_gather_objects(state_sha256(module)[:16])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the students of the {world_size()} processes diverged: {checksums}")
    return checksums


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun (which also gives every rank rank 0's initial
    weights), else ``module`` itself (None: None)."""
    if module is None or not is_distributed():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def rank_zero_first():
    """Run the ``with`` block on rank 0 first and on the other ranks after it (all of them at once): for a
    download that the other ranks then find in place. Call it on every rank; a no-op in a single process."""
    if rank() != 0:
        barrier()
    try:
        yield
    finally:
        # Also when rank 0 fails, so that the other ranks go on (and meet the same error) instead of hanging.
        if rank() == 0:
            barrier()
