"""Quantized layers. They hold settings and state; the arithmetic lives in :mod:`.functional`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import (
    WEIGHT_GRANULARITIES,
    check_bits,
    layerwise_fake_quant,
)
from .fused import granq_function, weight_function

__all__ = ["ACT_MODES", "QuantAct", "QuantConv2d", "QuantLinear"]

ACT_MODES = ("granq", "layerwise")


def _check_granularity(granularity: str) -> str:
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {granularity!r}")
    return granularity


class _WeightQuantMixin:
    """Shared settings of layers whose weight is fake-quantized from the float weight on every forward.

    ``granq_impl`` picks the implementation (:func:`.fused.weight_function`): all give the same values.
    """

    weight_bits: int
    weight_granularity: str

    def _init_quant(self, weight_bits: int, weight_granularity: str, granq_impl: str) -> None:
        self.weight_bits = check_bits(weight_bits)
        self.weight_granularity = _check_granularity(weight_granularity)
        self.granq_impl = granq_impl
        self.weight_fn = weight_function(granq_impl)  # weight_fake_quant, or its compiled fast path

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_fn(self.weight, self.weight_bits, self.weight_granularity)

    @classmethod
    def _copy_float(cls, quantized, float_module):
        quantized.load_state_dict(float_module.state_dict())
        quantized.train(float_module.training)
        return quantized.to(device=float_module.weight.device, dtype=float_module.weight.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, "
                f"weight_granularity={self.weight_granularity}, granq_impl={self.granq_impl}")


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized on every forward. Parameters stay in float."""

    def __init__(self, *args, weight_bits: int = 8, weight_granularity: str = "kernel", granq_impl: str = "auto",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, weight_granularity, granq_impl)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, weight_granularity: str = "kernel",
                   granq_impl: str = "auto") -> QuantConv2d:
        quantized = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            weight_bits=weight_bits, weight_granularity=weight_granularity, granq_impl=granq_impl,
        )
        return cls._copy_float(quantized, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized (one range per row) on every forward."""

    def __init__(self, *args, weight_bits: int = 8, weight_granularity: str = "kernel", granq_impl: str = "auto",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, weight_granularity, granq_impl)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, weight_granularity: str = "kernel",
                   granq_impl: str = "auto") -> QuantLinear:
        quantized = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        weight_bits=weight_bits, weight_granularity=weight_granularity, granq_impl=granq_impl)
        return cls._copy_float(quantized, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantAct(nn.Module):
    """Activation fake-quantizer.

    ``mode="granq"``: one range per (sample, channel), computed from the activation itself.
    ``mode="layerwise"``: one range per layer, an exponential moving average (``momentum``) of the
    batch min and max, bias-corrected, updated while tracking (``unfix()``) and frozen by ``fix()``.
    Until the first tracked batch the layer-wise range is empty and the output is meaningless, so
    layer-wise ranges must be calibrated before use.
    ``granq_impl`` picks the GranQ implementation (:func:`.fused.granq_function`): all give the same values.
    """

    def __init__(self, bits: int, mode: str = "granq", momentum: float = 0.9, granq_impl: str = "auto"):
        super().__init__()
        if mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {mode!r}")
        self.bits = check_bits(bits)
        self.mode = mode
        self.momentum = momentum
        self.tracking = True
        self.granq_impl = granq_impl
        self.granq_fn = granq_function(granq_impl)
        if mode == "layerwise":
            # Raw moving averages and momentum**steps; the range used is their bias-corrected ratio.
            self.register_buffer("running_min", torch.zeros(()))
            self.register_buffer("running_max", torch.zeros(()))
            self.register_buffer("momentum_power", torch.ones(()))
            self.register_buffer("x_min", torch.zeros(()))
            self.register_buffer("x_max", torch.zeros(()))

    def fix(self) -> None:
        """Freeze the layer-wise range."""
        self.tracking = False

    def unfix(self) -> None:
        """Track the layer-wise range on every forward."""
        self.tracking = True

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        self.running_min.mul_(self.momentum).add_(lo.to(self.running_min.dtype), alpha=1 - self.momentum)
        self.running_max.mul_(self.momentum).add_(hi.to(self.running_max.dtype), alpha=1 - self.momentum)
        self.momentum_power.mul_(self.momentum)
        correction = 1 - self.momentum_power
        torch.div(self.running_min, correction, out=self.x_min)
        torch.div(self.running_max, correction, out=self.x_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "granq":
            return self.granq_fn(x, self.bits)
        if self.tracking:
            self._track(x)
        return layerwise_fake_quant(x, self.bits, self.x_min, self.x_max)

    def extra_repr(self) -> str:
        impl = f", granq_impl={self.granq_impl}" if self.mode == "granq" else ""
        return f"bits={self.bits}, mode={self.mode}{impl}"
