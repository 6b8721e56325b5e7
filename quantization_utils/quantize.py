"""Model surgery: turn a float model into a fake-quantized student."""

from __future__ import annotations

import copy

import torch.nn as nn

from .functional import check_bits
from .modules import QuantAct, QuantConv2d, QuantLinear

__all__ = ["ACTIVATIONS", "count_modules", "quantize_model", "set_act_tracking"]

# Activations followed by a QuantAct. Their outputs are what the next layer's integer kernel reads.
ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _quantize_children(module: nn.Module, weight_bits: int, act_bits: int, act_mode: str,
                       weight_granularity: str, granq_impl: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            replacement = QuantConv2d.from_float(child, weight_bits, weight_granularity, granq_impl)
        elif isinstance(child, nn.Linear):
            replacement = QuantLinear.from_float(child, weight_bits, weight_granularity, granq_impl)
        elif isinstance(child, ACTIVATIONS):
            replacement = nn.Sequential(child, QuantAct(act_bits, act_mode, granq_impl=granq_impl))
        else:
            _quantize_children(child, weight_bits, act_bits, act_mode, weight_granularity, granq_impl)
            continue
        setattr(module, name, replacement)


def quantize_model(model: nn.Module, weight_bits: int, act_bits: int, act_mode: str = "granq",
                   weight_granularity: str = "kernel", granq_impl: str = "auto") -> nn.Module:
    """Return a fake-quantized copy of ``model``; ``model`` itself is not modified.

    Every Conv2d and Linear becomes a QuantConv2d / QuantLinear with ``weight_bits``; every ReLU and
    ReLU6 is followed by a QuantAct with ``act_bits`` and ``act_mode``. BatchNorm stays in float and
    the input image is not quantized. ``granq_impl`` picks the implementation of the activation and weight
    quantizers: ``auto`` (compiled where torch.compile works, else eager), ``compiled`` or ``eager``; all
    give the same values.
    """
    check_bits(weight_bits)
    check_bits(act_bits)
    quantized = copy.deepcopy(model)
    if isinstance(quantized, (nn.Conv2d, nn.Linear) + ACTIVATIONS):
        raise TypeError("quantize_model expects a network that contains layers, not a single layer")
    _quantize_children(quantized, weight_bits, act_bits, act_mode, weight_granularity, granq_impl)
    return quantized


def set_act_tracking(model: nn.Module, tracking: bool) -> None:
    """Unfreeze (``True``) or freeze (``False``) the layer-wise activation ranges of ``model``."""

    def apply(module: nn.Module) -> None:
        if isinstance(module, QuantAct):
            module.unfix() if tracking else module.fix()

    model.apply(apply)


def count_modules(model: nn.Module, types) -> int:
    """Number of submodules of ``model`` that are instances of ``types``."""
    return sum(isinstance(m, types) for m in model.modules())
