"""Integer codes of a quantized weight, and bit packing.

A weight fake-quantized by :func:`quantization_utils.weight_fake_quant` takes, in each row (an (out, in) kernel
or an output channel), the values ``(q + zp) / s`` with the row's scale ``s``, zero point ``zp`` and integer
codes ``q = round(s * w - zp)``. :func:`quantize_weight` gives the integers in the form both exports store:

    w_hat = (q - z) / s,    q in [-2**(b-1), 2**(b-1) - 1],    z = -zp (one integer per row)

``q - z`` equals ``q + zp`` exactly (small integers in float32), so ``(q - z) / s`` in float32 is the student's
weight bit for bit. Where rounding puts a code one step outside the b-bit range (a row's end at a tie), the
row's codes and zero point move together by that step, which leaves ``q - z`` unchanged (the zero point
staying a float32 value: a row whose values are all equal, as every row of a 1 x 1 kernel, has a range of
RANGE_EPS and zero points beyond 2**24, which are float32 values only at coarser steps). A row can even take
``2**b + 1`` codes, when both ends round outwards (``s * hi`` an exact half and ``s * lo`` just below one; one
row in some 10^5): its one code beyond the range is kept as it is, and :attr:`QuantizedWeight.overflow`
lists such codes.

:func:`pack_bits` stores unsigned integers of ``bits`` bits back to back, least significant bit first:
value ``i`` occupies bits ``i * bits`` to ``(i + 1) * bits - 1`` of the stream, and byte ``j`` holds bits
``8 j`` to ``8 j + 7``. 3-bit codes so take 3/32 of float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from quantization_utils import QuantConv2d, QuantLinear, weight_fake_quant
from quantization_utils.functional import per_row_params

__all__ = ["QuantizedWeight", "bits_for", "dequantize", "pack_bits", "packed_bytes", "quantize_weight",
           "quantized_layers", "unpack_bits"]


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` takes for ``count`` values of ``bits`` bits."""
    return math.ceil(count * bits / 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers ``values`` (each below ``2**bits``) packed into a flat uint8 tensor, LSB first.

    >>> pack_bits(torch.tensor([1, 2, 3, 4, 5]), 3).tolist()  # 001 010 011 100 101, read from the right
    [209, 88]
    """
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be from 1 to 62, got {bits}")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits - 1}] to be packed at {bits} bits")
    planes = (flat[:, None] >> torch.arange(bits)) & 1  # [count, bits]: the bits of each value, LSB first
    stream = planes.reshape(-1).to(torch.uint8)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8).to(torch.int64) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` values that :func:`pack_bits` packed at ``bits`` bits, as int64.

    >>> unpack_bits(pack_bits(torch.tensor([1, 2, 3, 4, 5]), 3), 3, 5).tolist()
    [1, 2, 3, 4, 5]
    """
    if packed.numel() != packed_bytes(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits "
                         f"({packed_bytes(count, bits)} bytes)")
    stream = (packed.reshape(-1).to(torch.int64)[:, None] >> torch.arange(8)) & 1
    planes = stream.reshape(-1)[:count * bits].view(count, bits)
    return (planes << torch.arange(bits)).sum(1)


def bits_for(low: int, high: int) -> int:
    """The fewest bits (at least 1) that hold the integers ``low`` to ``high`` as offsets from ``low``.

    >>> bits_for(-4, 3), bits_for(0, 0), bits_for(-22, 59)
    (3, 1, 7)
    """
    return max(1, int(high - low).bit_length())


@dataclass
class QuantizedWeight:
    """The integers of one fake-quantized weight, one row per range: ``codes`` [rows, row_length] and
    ``zero_point`` [rows] (int64), ``scale`` [rows] (float32); ``shape`` is the weight's."""

    codes: torch.Tensor
    zero_point: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    granularity: str

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def overflow(self) -> list[tuple[int, int]]:
        """(flat index, code) of the codes outside [-2**(b-1), 2**(b-1) - 1] (see the module docstring)."""
        flat = self.codes.reshape(-1)
        outside = ((flat < -(2 ** (self.bits - 1))) | (flat > 2 ** (self.bits - 1) - 1)).nonzero().flatten()
        return [(int(index), int(flat[index])) for index in outside]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` whose weight is fake-quantized, by name (QuantConv2d and QuantLinear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def _exact_in_float32(values: torch.Tensor) -> torch.Tensor:
    """Whether each integer of ``values`` (int64) is a float32 value."""
    return values.to(torch.float32).to(torch.int64) == values


def _row_shifts(codes: torch.Tensor, zero: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Per row, the shift that brings its codes into [low, high] and leaves its zero point a float32 value, so
    that ``(q - z)`` in float32 stays what it was; 0 for a row that cannot be shifted so."""
    row_low, row_high = codes.amin(1), codes.amax(1)
    shift = (row_high - high).clamp(min=0) + (row_low - low).clamp(max=0)
    exact = _exact_in_float32(zero - shift)
    if exact.all():
        return shift
    # Zero points beyond 2**24 (a row whose values are all equal: its range is RANGE_EPS wide) are float32
    # values only at coarser steps: try the placements of those rows in the range until each has one.
    rows = (~exact).nonzero().flatten()
    for start in range(low, high + 1):
        candidate = row_low[rows] - start
        fits = (row_high[rows] - candidate <= high) & _exact_in_float32(zero[rows] - candidate)
        shift[rows[fits]] = candidate[fits]
        exact[rows[fits]] = True
        rows = rows[~fits]
        if rows.numel() == 0:
            break
    shift[rows] = 0
    return shift


@torch.no_grad()
def quantize_weight(layer: nn.Module) -> QuantizedWeight:
    """The integer form of ``layer``'s fake-quantized weight (see the module docstring); checked to give the
    quantized weight bit for bit."""
    weight = layer.weight.detach().float()
    bits, granularity = layer.weight_bits, layer.weight_granularity
    leading = 2 if granularity == "kernel" and weight.dim() == 4 else 1
    scale, zero_point = per_row_params(weight, bits, leading)
    # The student's float32 integers, exactly: q is small; zp can be large where a row's range is tiny.
    codes = torch.round(scale * weight - zero_point).reshape(math.prod(weight.shape[:leading]), -1).to(torch.int64)
    scale, zero = scale.reshape(-1), (-zero_point.reshape(-1)).to(torch.int64)
    # A row whose codes leave the b-bit range by rounding at its ends moves as a whole, zero point with it.
    shift = _row_shifts(codes, zero, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    result = QuantizedWeight(codes - shift[:, None], zero - shift, scale.contiguous(), tuple(weight.shape), bits,
                             granularity)
    # The eager formula: the layer's own implementation (compiled or eager) gives the same values.
    if not torch.equal(dequantize(result), weight_fake_quant(weight, bits, granularity)):
        raise ArithmeticError("the integer codes do not reproduce the layer's quantized weight")
    return result


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """``(codes - zero_point) / scale`` per row, in float32 as the student computes ``(q + zp) / s``, in the
    weight's shape: the student's quantized weight."""
    integers = weight.codes.to(torch.float32) - weight.zero_point.to(torch.float32)[:, None]
    return (integers / weight.scale[:, None]).reshape(weight.shape)
