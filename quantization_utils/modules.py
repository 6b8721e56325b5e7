"""Quantized layers. They hold settings and state; the arithmetic lives in :mod:`.functional`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act_quantizers import ACT_QUANTIZERS, make_act_quantizer
from .functional import WEIGHT_GRANULARITIES, check_bits
from .fused import check_impl, weight_function

__all__ = ["ActQuant", "QuantAct", "QuantConv2d", "QuantLinear", "WeightQuant"]


@dataclass(frozen=True)
class WeightQuant:
    """How a layer's weight is fake-quantized: ``bits``, ``granularity`` (one range per (out, in) kernel
    or per output channel) and ``impl``, the implementation (:func:`.fused.weight_function`: ``auto``,
    ``compiled`` or ``eager``); every implementation gives the same values.

    >>> WeightQuant(4, "channel")
    WeightQuant(bits=4, granularity='channel', impl='auto')
    """

    bits: int
    granularity: str = "kernel"
    impl: str = "auto"

    def __post_init__(self):
        check_bits(self.bits)
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got {self.granularity!r}")
        check_impl(self.impl)


@dataclass(frozen=True)
class ActQuant:
    """How an activation is fake-quantized: ``bits``, ``mode`` (the quantizer registered under that name in
    :data:`.act_quantizers.ACT_QUANTIZERS`), ``momentum`` of the moving average of quantizers that track
    ranges, and ``impl``, the implementation of those that have several (:func:`.fused.granq_function`);
    every implementation gives the same values.

    >>> ActQuant(4, "layerwise")
    ActQuant(bits=4, mode='layerwise', momentum=0.9, impl='auto')
    """

    bits: int
    mode: str = "granq"
    momentum: float = 0.9
    impl: str = "auto"

    def __post_init__(self):
        check_bits(self.bits)
        ACT_QUANTIZERS[self.mode]  # an unknown name raises, listing the registered ones
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        check_impl(self.impl)


class _QuantWeightLayer:
    """A float layer whose weight is fake-quantized from the float weight on every forward.

    Subclasses list the constructor arguments that copy a float layer in ``_float_kwargs``.
    """

    def __init__(self, *args, quant: WeightQuant, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant = quant
        self.weight_fn = weight_function(quant.impl)  # weight_fake_quant, or its compiled fast path

    @property
    def weight_bits(self) -> int:
        return self.quant.bits

    @property
    def weight_granularity(self) -> str:
        return self.quant.granularity

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_fn(self.weight, self.quant.bits, self.quant.granularity)

    @classmethod
    def from_float(cls, module: nn.Module, quant: WeightQuant):
        """A quantized copy of the float ``module``: same arguments, weights, mode, device and dtype."""
        quantized = cls(**cls._float_kwargs(module), quant=quant)
        quantized.load_state_dict(module.state_dict())
        quantized.train(module.training)
        return quantized.to(device=module.weight.device, dtype=module.weight.dtype)

    def extra_repr(self) -> str:
        q = self.quant
        return f"{super().extra_repr()}, weight_bits={q.bits}, weight_granularity={q.granularity}, quant_impl={q.impl}"


class QuantConv2d(_QuantWeightLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized on every forward. Parameters stay in float."""

    @staticmethod
    def _float_kwargs(conv: nn.Conv2d) -> dict:
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantWeightLayer, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized (one range per row) on every forward."""

    @staticmethod
    def _float_kwargs(linear: nn.Linear) -> dict:
        return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantAct(nn.Module):
    """Activation fake-quantizer: holds the settings (``quant``, an :class:`ActQuant`) and the state, and calls
    the quantizer registered as ``quant.mode``.

    ``quant.mode`` names an entry of :data:`.act_quantizers.ACT_QUANTIZERS`: ``"granq"`` (one range per
    (sample, channel), from the activation itself), ``"layerwise"`` (one tracked range per layer) or
    ``"channel"`` (one tracked range per channel), or any quantizer registered with
    :func:`.act_quantizers.register_act_quantizer`. Tracked ranges (``tracks_ranges``) are a bias-corrected
    exponential moving average (``quant.momentum``) of the batch ranges, updated while tracking (``unfix()``) and
    frozen by ``fix()``; until the first tracked batch they are empty, so they must be calibrated before use.
    """

    def __init__(self, quant: ActQuant):
        super().__init__()
        self.quant = quant
        self.quantizer = make_act_quantizer(quant)
        self.tracking = True
        self.quantizer.init_state(self)

    @property
    def tracks_ranges(self) -> bool:
        """Whether the quantizer tracks ranges that must be calibrated before use."""
        return self.quantizer.tracks_ranges

    def fix(self) -> None:
        """Freeze the tracked ranges (no effect on quantizers without them)."""
        self.tracking = False

    def unfix(self) -> None:
        """Track the ranges on every forward (no effect on quantizers without them)."""
        self.tracking = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.quantizer.load_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self, x)

    def extra_repr(self) -> str:
        return f"bits={self.quant.bits}, mode={self.quant.mode}{self.quantizer.extra_repr(self)}"
