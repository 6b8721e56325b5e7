"""Test-set accuracy of a model: top-1 and top-5, counted on the device and summed over ranks."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..system import distributed
from ..system.errors import UserError

__all__ = ["evaluate"]


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
