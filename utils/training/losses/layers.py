"""Rules that find the layers a student loss term reads, from a model's structure, without its classes."""

import torch
import torch.nn as nn

from .registry import MissingLayersError

__all__ = ["last_spatial_conv", "stage_blocks"]


def stage_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of every stage: the children of each ``nn.Sequential`` whose children are all of one
    class and each hold a convolution inside, outermost first (a stage inside a found block is not searched).

    That finds the residual blocks of the ResNet family wherever they are stacked in a Sequential: pytorchcv's
    units (``features.stage1.unit1``, ... of resnet20_cifar10, resnet18, wrn16_10), torchvision's BasicBlock and
    Bottleneck (``layer1.0``, ...) and the option-A ResNet-20 (``layer1.0``, ...); also the repeated units of
    pytorchcv's MobileNetV2 and DenseNet. Plain sequences of layers (a VGG's ``features``, mixed classes) have none.

    >>> stage = nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()) for _ in range(2)])
    >>> stage_blocks(nn.Sequential(nn.Conv2d(3, 3, 1), stage))
    ['1.0', '1.1']
    """
    blocks = []
    for name, module in model.named_modules():
        children = list(module.named_children())
        if (not isinstance(module, nn.Sequential) or not children
                or any(name.startswith(block + ".") for block in blocks)):
            continue
        same_class = len({type(child) for _, child in children}) == 1
        if same_class and all(_holds_conv(child) for _, child in children):
            blocks += [f"{name}.{child}" if name else child for child, _ in children]
    if not blocks:
        raise MissingLayersError("it reads the outputs of residual blocks (the children of an nn.Sequential whose "
                                 "children are all of one class and each hold a convolution), and none was found")
    return blocks


def _holds_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules() if m is not module)


def last_spatial_conv(model: nn.Module, image: torch.Tensor) -> str:
    """Name of the last convolution that ``model`` runs on ``image`` whose output is larger than 1 x 1: the one
    before global pooling, not a 1 x 1 classifier applied after it (pytorchcv's MobileNetV2 ``output``)."""
    calls = []
    handles = [module.register_forward_hook(
        lambda m, i, output, name=name: calls.append((name, output.shape[2:].numel())))
        for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    try:
        model(image)
    finally:
        for handle in handles:
            handle.remove()
    spatial = [name for name, size in calls if size > 1]
    if not spatial:
        raise MissingLayersError("it reads the output of the last convolution with a spatial output, and the network "
                                 "runs no Conv2d with an output larger than 1 x 1")
    return spatial[-1]
