"""The student as the ONNX graph computes it: modules that torch.onnx.export turns into standard operators.

:func:`deploy_model` copies a fake-quantized student and replaces

- each QuantConv2d / QuantLinear by :class:`DeployConv2d` / :class:`DeployLinear`, which hold the integer codes,
  scales and zero points of :mod:`.codes` and compute the weight with ``DequantizeLinear``: per output
  channel on the weight itself, per (out, in) kernel on the weight viewed as [out * in, kh * kw] and then
  reshaped. Codes are stored as int8 and become INT4 for ``qw`` <= 4 (:mod:`.onnx_export`); a layer with one
  of the rare rows of ``2**qw + 1`` codes (:mod:`.codes`) takes the next wider type (INT8, INT16). A row whose
  zero point lies outside the type's range (a kernel whose values all have one sign) moves with its codes
  towards it, as far as they fit, and keeps the part that still does not fit as an integer ``remainder``,
  dequantized with the same scale and subtracted;
- each QuantAct by the ONNX form of its quantizer's class (:data:`ONNX_FORMS`, beside the registry
  ``ACT_QUANTIZERS``): GranQ by :class:`GranQDeploy`, the (min, max) of each (sample, channel) over H and W
  (ReduceMin, ReduceMax), then the project's formula (:func:`quantization_utils.quant_params`,
  :func:`quantization_utils.fake_quantize`) in standard operators; a layer-wise or channel range by
  :class:`RangeDeploy`, its frozen range as constant ``Clip``/``QuantizeLinear``/``DequantizeLinear`` (per
  tensor, or per channel along axis 1). A quantizer without an entry has no ONNX form.

ONNX multiplies by ``1 / scale`` where the student divides by ``scale``, so values can differ in the last bit;
the ``granq_export`` operators are custom torch operators whose ONNX form :data:`TRANSLATIONS` gives.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization_utils import ACT_QUANTIZERS, QuantAct, QuantConv2d, QuantLinear, fake_quantize, quant_params
from quantization_utils.act_quantizers import ChannelRange, GranQ, LayerwiseRange

from ..system.errors import UserError
from .codes import QuantizedWeight, quantize_weight

__all__ = ["GRANQ_DEPLOYMENT", "ONNX_FORMS", "DeployConv2d", "DeployLinear", "GranQDeploy", "OnnxForm", "RangeDeploy",
           "TRANSLATIONS", "deploy_model", "deployment", "onnx_act_modes"]

GRANQ_DEPLOYMENT = "integer weights, dynamic per-(sample, channel) activations, float convolution"
# (range, torch dtype of the buffer) of INT4, INT8, INT16; INT4 is stored as int8 until the graph is written.
INTEGER_TYPES = (((-8, 7), torch.int8), ((-128, 127), torch.int8), ((-(2**15), 2**15 - 1), torch.int16))


def _codes_type(bits: int, codes: torch.Tensor) -> tuple[tuple[int, int], torch.dtype]:
    """The ONNX integer type of ``bits``-bit codes (INT4 up to 4 bits, INT8 above), or the next wider one for a
    layer with a row of ``2**bits + 1`` codes that do not fit it (:mod:`.codes`)."""
    first = 0 if bits <= 4 else 1
    for (low, high), dtype in INTEGER_TYPES[first:]:
        if codes.numel() == 0 or (codes.min() >= low and codes.max() <= high):
            return (low, high), dtype
    raise ValueError("weight codes beyond INT16")


@torch.library.custom_op("granq_export::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      remainder: Optional[torch.Tensor], remainder_scale: Optional[torch.Tensor],
                      shape: list[int]) -> torch.Tensor:
    """``(codes - zero_point) * scale`` per row (dimension 0), minus ``remainder * remainder_scale`` (``scale``
    where None), reshaped to ``shape`` (empty: as ``codes``): ONNX's ``DequantizeLinear`` with ``axis = 0``."""
    view = (-1,) + (1,) * (codes.dim() - 1)
    weight = (codes.float() - zero_point.float().view(view)) * scale.view(view)
    if remainder is not None:
        weight = weight - remainder.float() * (scale if remainder_scale is None else remainder_scale).view(view)
    return weight.reshape(shape) if shape else weight


@dequantize_weight.register_fake
def _(codes, scale, zero_point, remainder, remainder_scale, shape):
    return codes.new_empty(shape if shape else codes.shape, dtype=torch.float32)


@torch.library.custom_op("granq_export::quantize_range", mutates_args=())
def quantize_range(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor,
                   high: torch.Tensor) -> torch.Tensor:
    """``Clip(x, low, high)``, then ``QuantizeLinear`` and ``DequantizeLinear`` with ``scale`` and ``zero_point``,
    per tensor (scalars) or per channel along dimension 1 (vectors; ``low`` and ``high`` shaped to broadcast)."""
    view = (1, -1) + (1,) * (x.dim() - 2) if scale.dim() else ()
    scale, zero_point = scale.view(view), zero_point.float().view(view)
    codes = torch.round(torch.minimum(torch.maximum(x, low), high) / scale) + zero_point
    return (codes - zero_point) * scale


@quantize_range.register_fake
def _(x, scale, zero_point, low, high):
    return torch.empty_like(x)


def _dequantize_weight_onnx(codes, scale, zero_point, remainder, remainder_scale, shape):
    from onnxscript import opset21 as op

    weight = op.DequantizeLinear(codes, scale, zero_point, axis=0)
    if remainder is not None:
        step = scale if remainder_scale is None else remainder_scale
        weight = op.Sub(weight, op.DequantizeLinear(remainder, step, axis=0))
    return op.Reshape(weight, op.Constant(value_ints=list(shape))) if shape else weight


def _quantize_range_onnx(x, scale, zero_point, low, high):
    from onnxscript import opset21 as op

    per_channel = len(scale.shape) == 1
    clipped = op.Max(op.Min(x, high), low) if per_channel else op.Clip(x, low, high)
    axis = {"axis": 1} if per_channel else {}
    return op.DequantizeLinear(op.QuantizeLinear(clipped, scale, zero_point, **axis), scale, zero_point, **axis)


TRANSLATIONS = {torch.ops.granq_export.dequantize_weight.default: _dequantize_weight_onnx,
                torch.ops.granq_export.quantize_range.default: _quantize_range_onnx}


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """ONNX's scale: the float32 nearest to 1 / scale."""
    return (1.0 / scale.double()).float()


class _IntegerWeight:
    """The buffers of a weight in ONNX's form: int8 codes, float32 scales (``1 / s``), int8 zero points, and an
    integer remainder (int8, int16 or int32, [rows, 1, ...]) with its scale where a zero point does not fit the
    type of the codes (the scale ``2**k / s`` where the remainder is beyond int32)."""

    def _set_weight(self, weight: QuantizedWeight, per_kernel: bool) -> None:
        (low, high), dtype = _codes_type(weight.bits, weight.codes)
        codes, zero_point = weight.codes, weight.zero_point
        # A zero point outside the type moves towards it with the row's codes, as far as the codes stay inside
        # (q - z is unchanged); what is left becomes the remainder.
        wanted = zero_point - zero_point.clamp(low, high)
        shift = torch.maximum(torch.minimum(wanted, codes.amin(1) - low), codes.amax(1) - high)
        codes, zero_point = codes - shift[:, None], zero_point - shift
        fitted = zero_point.clamp(low, high)
        remainder = zero_point - fitted
        codes = codes if per_kernel else codes.view(weight.shape)
        self.register_buffer("codes", codes.to(dtype))
        self.register_buffer("scale", _reciprocal(weight.scale))
        self.register_buffer("zero_point", fitted.to(dtype))
        # Beyond int32 (zero points of rows whose values are all equal) the remainder drops low bits: 2**-31 of it.
        steps = (remainder.abs().clamp(min=1).log2().floor().to(torch.int64) - 30).clamp(min=0)
        remainder = torch.round(remainder.double() / torch.exp2(steps.double())).to(torch.int64)
        extra = remainder.view((-1,) + (1,) * (codes.dim() - 1))
        wide = next(t for t in (torch.int8, torch.int16, torch.int32) if remainder.abs().max() <= torch.iinfo(t).max)
        self.register_buffer("remainder", extra.to(wide) if remainder.any() else None)
        coarse = bool(remainder.any() and steps.any())
        self.register_buffer("remainder_scale", self.scale * torch.exp2(steps.float()) if coarse else None)
        self.weight_shape = list(weight.shape) if per_kernel else []
        self.weight_bits = weight.bits

    def deployed_weight(self) -> torch.Tensor:
        return torch.ops.granq_export.dequantize_weight(self.codes, self.scale, self.zero_point, self.remainder,
                                                        self.remainder_scale, self.weight_shape)


class DeployConv2d(_IntegerWeight, nn.Conv2d):
    """A QuantConv2d with its integer weight: the convolution reads the dequantized weight (see module docstring)."""

    def __init__(self, layer: QuantConv2d):
        super().__init__(**QuantConv2d._float_kwargs(layer))
        del self.weight
        weight = quantize_weight(layer)
        self._set_weight(weight, per_kernel=weight.granularity == "kernel")
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.deployed_weight(), self.bias)


class DeployLinear(_IntegerWeight, nn.Module):
    """A QuantLinear with its integer weight (one range per row)."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self._set_weight(quantize_weight(layer), per_kernel=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.deployed_weight(), self.bias)


def _range_dims(x: torch.Tensor) -> tuple[int, ...]:
    if x.dim() == 4:
        return (2, 3)
    if x.dim() == 2:
        return (1,)
    raise ValueError(f"a GranQ activation must be [N, C, H, W] or [N, F], got shape {tuple(x.shape)}")


class GranQDeploy(nn.Module):
    """GranQ in the graph: lo, hi = ReduceMin, ReduceMax of each (sample, channel) over H, W (of each row of
    [N, F]); scale, zero point, round and dequantize as :func:`quantization_utils.granq_fake_quant`."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = _range_dims(x)
        low, high = torch.amin(x, dim=dims, keepdim=True), torch.amax(x, dim=dims, keepdim=True)
        return fake_quantize(x, *quant_params(low, high, self.bits))


class RangeDeploy(nn.Module):
    """A frozen layer-wise or channel range as constant Clip / QuantizeLinear / DequantizeLinear.

    With the student's scale ``s`` and zero point ``zp`` of [x_min, x_max]: ONNX scale ``1 / s``, zero point
    ``2**(b-1) - zp`` as UINT8 (``-zp`` as INT16 where that does not fit), and x clipped to the grid's ends
    ``(-2**(b-1) + zp) / s`` and ``(2**(b-1) - 1 + zp) / s`` first, which is the student's clamp of the code
    to b bits.
    """

    def __init__(self, act: QuantAct):
        super().__init__()
        if act.x_min.numel() == 0:
            raise UserError("a channel-wise activation quantizer of the student has no ranges (never calibrated)")
        scale, zero_point = quant_params(act.x_min.float(), act.x_max.float(), act.quant.bits)
        half = 2 ** (act.quant.bits - 1)
        # UINT8 codes q + 2**(b-1), zero point 2**(b-1) - zp (0 for a range from 0): the activations' type that
        # runtimes fuse (onnxruntime's QDQ passes expect it); int16 where a range lies away from 0.
        unsigned = (half - zero_point).to(torch.int64)
        fits = bool((unsigned >= 0).all() and (unsigned <= 255).all())
        onnx_zero = unsigned.to(torch.uint8) if fits else (-zero_point).to(torch.int16)
        self.register_buffer("scale", _reciprocal(scale))
        self.register_buffer("zero_point", onnx_zero)
        self.register_buffer("low", (-half + zero_point) / scale)
        self.register_buffer("high", (half - 1 + zero_point) / scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.low, self.high
        if self.scale.dim():  # per channel: the clip bounds broadcast along dimension 1
            view = (1, -1) + (1,) * (x.dim() - 2)
            low, high = low.view(view), high.view(view)
        return torch.ops.granq_export.quantize_range(x, self.scale, self.zero_point, low, high)


@dataclass(frozen=True)
class OnnxForm:
    """How the QuantActs of one quantizer class appear in the ONNX graph: ``deploy(act)``, the module that computes
    as the graph does, and ``deploys_as``, what the model's metadata says of the activations."""

    deploy: Callable[[QuantAct], nn.Module]
    deploys_as: str


# The ONNX form of each activation quantizer class of ACT_QUANTIZERS that has one. Looked up by the exact class:
# a subclass computes something else.
ONNX_FORMS = {
    GranQ: OnnxForm(lambda act: GranQDeploy(act.quant.bits), GRANQ_DEPLOYMENT),
    LayerwiseRange: OnnxForm(RangeDeploy, "QDQ"),
    ChannelRange: OnnxForm(RangeDeploy, "QDQ"),
}


def onnx_act_modes() -> list[str]:
    """The registered ``act_mode`` names whose quantizer has an ONNX form."""
    return [name for name in ACT_QUANTIZERS if ACT_QUANTIZERS[name] in ONNX_FORMS]


def deployment(act_mode: str) -> str:
    """What the ONNX model of a student whose activations ``act_mode`` quantizes deploys as (:class:`OnnxForm`)."""
    form = ONNX_FORMS.get(ACT_QUANTIZERS[act_mode])
    if form is None:
        raise UserError(f"act_mode {act_mode!r} has no ONNX form; the quantizers with one: "
                        f"{', '.join(onnx_act_modes())}")
    return form.deploys_as


def _deploy_children(module: nn.Module, prefix: str) -> None:
    for name, child in module.named_children():
        path = prefix + name
        if type(child) is QuantConv2d:
            replacement = DeployConv2d(child)
        elif type(child) is QuantLinear:
            replacement = DeployLinear(child)
        elif isinstance(child, (QuantConv2d, QuantLinear)):
            raise UserError(f"layer {path} ({type(child).__name__}) is a quantized layer the ONNX exporter does not "
                            f"know; it knows QuantConv2d and QuantLinear")
        elif isinstance(child, QuantAct):
            form = ONNX_FORMS.get(type(child.quantizer))
            if form is None:
                raise UserError(f"act_mode {child.quant.mode!r} (layer {path}) has no ONNX form; the quantizers with "
                                f"one: {', '.join(onnx_act_modes())}")
            replacement = form.deploy(child)
        else:
            _deploy_children(child, path + ".")
            continue
        setattr(module, name, replacement)


def deploy_model(student: nn.Module) -> nn.Module:
    """A copy of ``student`` (in eval mode) that computes as the ONNX graph will; ``student`` is not modified."""
    deployed = copy.deepcopy(student).eval()
    _deploy_children(deployed, "")
    return deployed
