"""Test-set accuracy of a model: top-1 and top-5, counted on the device and summed over ranks."""

from __future__ import annotations

import torch
import torch.nn as nn

from quantization_utils import set_act_tracking

from ..system import distributed
from ..system.errors import UserError

__all__ = ["evaluate", "evaluate_frozen"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent over ``loader`` (summed over ranks when distributed).

    Hits are counted on the device and read back once, at the end: the loop never waits for the GPU.
    """
    model.eval()
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5
    total = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        hits += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
        total += labels.shape[0]
    counts = torch.cat([hits, torch.tensor([total], device=device)])
    top1_hits, top5_hits, total = distributed.all_reduce(counts).tolist()
    if total == 0:
        raise UserError("the test set is empty")
    return 100.0 * top1_hits / total, 100.0 * top5_hits / total


def evaluate_frozen(model: nn.Module, loader, device, memory_format=torch.contiguous_format) -> tuple[float, float]:
    """:func:`evaluate` of a student or teacher with its activation ranges frozen, in the default memory layout.

    The default layout, so that accuracies equal those of any plain implementation (channels_last convolutions
    round differently); ``model`` is then put back in ``memory_format``, the layout it trains in.
    """
    set_act_tracking(model, False)
    model.to(memory_format=torch.contiguous_format)
    try:
        return evaluate(model, loader, device)
    finally:
        model.to(memory_format=memory_format)
