"""Pure fake-quantization functions: ranges, parameters and the straight-through estimator.

Every quantizer here uses the same asymmetric uniform grid. For a range [lo, hi] and ``bits``:

    n          = 2**bits - 1
    scale      = n / max(hi - lo, 1e-8)
    zero_point = round(scale * lo) + 2**(bits - 1)
    q          = round(scale * x - zero_point)
    y          = (q + zero_point) / scale

The gradient is straight-through: dL/dx = dL/dy. The range is never differentiated.

The quantizers differ only in which elements share a range:

- :func:`granq_fake_quant`: one range per (sample, channel) of an activation, computed for all rows
  at once (GranQ's vectorized pre-scaling).
- :func:`channel_loop_fake_quant`: the same values, one Python iteration per channel (the conventional
  per-channel implementation; kept as a speed baseline and a test oracle).
- :func:`layerwise_fake_quant`: one range for the whole tensor, given by the caller (GDFQ family).
- :func:`channel_fake_quant`: one range per channel, shared by every sample, given by the caller
  (the conventional channel-wise activation quantizer); :func:`channel_range` is its batch range.
- :func:`weight_fake_quant`: one range per (out, in) kernel or per output channel of a weight.

:func:`per_row_values` gives the same values without a gradient rule, through :func:`grouped_values`,
the pure function that :mod:`.fused` compiles; :class:`StraightThrough` gives such a function the
straight-through gradient.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "WEIGHT_GRANULARITIES",
    "StraightThrough",
    "channel_fake_quant",
    "channel_loop_fake_quant",
    "channel_range",
    "check_bits",
    "fake_quantize",
    "granq_fake_quant",
    "grouped_values",
    "is_channels_last",
    "layerwise_fake_quant",
    "per_row_fake_quant",
    "per_row_params",
    "per_row_values",
    "quant_params",
    "range_groups",
    "range_ungroup",
    "weight_fake_quant",
]

MIN_BITS = 2
MAX_BITS = 8
WEIGHT_GRANULARITIES = ("kernel", "channel")
RANGE_EPS = 1e-8


def check_bits(bits) -> int:
    """Return ``bits`` if it is an integer from 2 to 8, else raise ValueError naming it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def quant_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the asymmetric grid covering [lo, hi].

    >>> scale, zero_point = quant_params(torch.tensor(0.0), torch.tensor(3.0), bits=2)
    >>> scale.item(), zero_point.item()
    (1.0, 2.0)
    """
    span = torch.clamp(hi - lo, min=RANGE_EPS)
    # torch.div, not ``n / span``: Python's reflected division multiplies by a reciprocal, which can
    # differ from the true quotient in the last bit.
    scale = torch.div(torch.full_like(span, 2**bits - 1), span)
    zero_point = torch.round(scale * lo) + 2 ** (bits - 1)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  clamp_bits: int | None = None) -> torch.Tensor:
    """Values of ``(round(scale * x - zero_point) + zero_point) / scale``, with no gradient rule.

    With ``clamp_bits`` the integer q is clamped to [-2**(b-1), 2**(b-1) - 1], which matters only
    when x can leave the range the parameters were computed from (a layer-wise running range).
    """
    q = torch.round(scale * x - zero_point)
    if clamp_bits is not None:
        q = torch.clamp(q, -(2 ** (clamp_bits - 1)), 2 ** (clamp_bits - 1) - 1)
    return (q + zero_point) / scale


class StraightThrough(torch.autograd.Function):
    """Apply a value function in the forward pass; pass the gradient through unchanged in the backward pass.

    forward:  y = values_fn(x, *args), computed without autograd (the function may be compiled)
    backward: dL/dx = dL/dy
    """

    @staticmethod
    def forward(ctx, x, values_fn, *args):
        ctx.num_args = len(args)
        return values_fn(x, *args)

    @staticmethod
    def backward(ctx, grad_output):
        return (grad_output, None) + (None,) * ctx.num_args


def per_row_params(x: torch.Tensor, bits: int, leading_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each index of the first ``leading_dims`` dimensions of ``x``.

    The range of each row is the (min, max) over all remaining dimensions of the detached input;
    the results have shape ``x.shape[:leading_dims] + (1,) * (x.dim() - leading_dims)``.
    """
    rows = x.detach().reshape(*x.shape[:leading_dims], -1)
    lo, hi = torch.aminmax(rows, dim=-1, keepdim=True)
    range_shape = x.shape[:leading_dims] + (1,) * (x.dim() - leading_dims)
    return quant_params(lo.view(range_shape), hi.view(range_shape), bits)


def per_row_fake_quant(x: torch.Tensor, bits: int, leading_dims: int) -> torch.Tensor:
    """Fake-quantize with one range per index of the first ``leading_dims`` dimensions.

    The range of each row is the (min, max) over all remaining dimensions, taken from the detached
    input. ``leading_dims=2`` on [N, C, H, W] gives one range per (sample, channel).
    """
    check_bits(bits)
    scale, zero_point = per_row_params(x, bits, leading_dims)
    return StraightThrough.apply(x, fake_quantize, scale, zero_point)


def _activation_leading_dims(x: torch.Tensor) -> int:
    if x.dim() == 4:
        return 2
    if x.dim() == 2:
        return 1
    raise ValueError(f"expected an activation of shape [N, C, H, W] or [N, F], got shape {tuple(x.shape)}")


def granq_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """GranQ activation quantizer: one (min, max) per (sample, channel), all channels at once.

    x of shape [N, C, H, W] gets one range per (n, c) over H x W; x of shape [N, F] one per row.
    Gradient: straight-through.

    >>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.1, 0.2, 0.3]])
    >>> granq_fake_quant(x, bits=2).tolist() == x.tolist()  # 4 evenly spaced values fit 2 bits
    True
    """
    return per_row_fake_quant(x, bits, _activation_leading_dims(x))


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor stored as [N, H, W, C] (and not also plainly contiguous, as when C or H * W is 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def range_groups(x: torch.Tensor, leading_dims: int, channels_last: bool) -> torch.Tensor:
    """``x`` viewed so that each per-row range (one per index of the first ``leading_dims`` dims) covers dim 1.

    In memory order, as a view where possible: rows [prod(leading), rest] for contiguous tensors; for a
    channels_last [N, C, H, W], [N, H * W, C] (one range per (n, c)) or rows [N, H * W * C] (one per n).
    :func:`range_ungroup` maps the result back.
    """
    if channels_last:
        nhwc = x.permute(0, 2, 3, 1)
        n, h, w, c = nhwc.shape
        return nhwc.reshape(n, h * w, c) if leading_dims == 2 else nhwc.reshape(n, h * w * c)
    return x.reshape(math.prod(x.shape[:leading_dims]), -1)


def range_ungroup(y: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """The inverse of :func:`range_groups` for a tensor of ``shape``."""
    if channels_last:
        n, c, h, w = shape
        return y.view(n, h, w, c).permute(0, 3, 1, 2)
    return y.view(shape)


def grouped_values(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize with one (min, max) range per index of every dimension but dimension 1, over dimension 1.

    [R, L]: one range per row; [N, L, C]: one per (n, c). No gradient rule, no checks: the pure function
    the fast path compiles, so that one compilation per rank serves every shape.
    """
    lo, hi = torch.aminmax(groups.detach(), dim=1, keepdim=True)
    scale, zero_point = quant_params(lo, hi, bits)
    return fake_quantize(groups, scale, zero_point)


def per_row_values(x: torch.Tensor, bits: int, leading_dims: int) -> torch.Tensor:
    """The values of :func:`per_row_fake_quant` through :func:`grouped_values`, with no gradient rule.

    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.equal(per_row_values(x, 3, 2), granq_fake_quant(x, 3))
    True
    """
    channels_last = is_channels_last(x)
    return range_ungroup(grouped_values(range_groups(x, leading_dims, channels_last), bits), x.shape, channels_last)


def channel_loop_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The same values as :func:`granq_fake_quant`, computed with a Python loop over channels.

    For [N, C, H, W] each iteration quantizes one channel of every sample; for [N, F] one row.
    This is the conventional per-channel implementation GranQ's vectorization replaces.
    """
    check_bits(bits)
    if _activation_leading_dims(x) == 1:
        return torch.stack([per_row_fake_quant(row, bits, leading_dims=0) for row in x])
    channels = [per_row_fake_quant(x[:, c], bits, leading_dims=1) for c in range(x.shape[1])]
    return torch.stack(channels, dim=1)


def layerwise_fake_quant(x: torch.Tensor, bits: int, x_min, x_max) -> torch.Tensor:
    """One range [x_min, x_max] for the whole tensor; values outside it saturate.

    Gradient: straight-through (also for saturated values, as in GDFQ).

    >>> layerwise_fake_quant(torch.tensor([-1.0, 0.4, 9.0]), 2, 0.0, 3.0).tolist()
    [0.0, 0.0, 3.0]
    """
    check_bits(bits)
    x_min = torch.as_tensor(x_min, dtype=x.dtype, device=x.device)
    x_max = torch.as_tensor(x_max, dtype=x.dtype, device=x.device)
    scale, zero_point = quant_params(x_min, x_max, bits)
    return StraightThrough.apply(x, fake_quantize, scale, zero_point, bits)


def channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (min, max) of each channel of ``x`` over the batch: over N, H, W of [N, C, H, W], over N of [N, C].

    >>> lo, hi = channel_range(torch.tensor([[0.5, -2.0], [1.5, 4.0]]))
    >>> lo.tolist(), hi.tolist()
    ([0.5, -2.0], [1.5, 4.0])
    """
    if x.dim() < 2:
        raise ValueError(f"expected an activation of shape [N, C, ...], got shape {tuple(x.shape)}")
    dims = (0, *range(2, x.dim()))
    return torch.amin(x, dim=dims), torch.amax(x, dim=dims)


def channel_fake_quant(x: torch.Tensor, bits: int, x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
    """One range [x_min[c], x_max[c]] per channel c (dimension 1), shared by all samples; values outside saturate.

    For x of shape [N, C, H, W] (or [N, C]) and ranges of shape [C], element x[n, c, h, w] gets the grid of
    [x_min[c], x_max[c]]: y = (clamp(round(s_c * x - z_c), -2**(b-1), 2**(b-1) - 1) + z_c) / s_c.
    Gradient: straight-through (also for saturated values, as :func:`layerwise_fake_quant`).

    >>> x = torch.tensor([[0.4, 14.0], [2.6, 30.0], [9.0, -5.0]])  # 3 samples, 2 channels
    >>> channel_fake_quant(x, 2, torch.tensor([0.0, 0.0]), torch.tensor([3.0, 30.0])).tolist()
    [[0.0, 10.0], [3.0, 30.0], [3.0, 0.0]]
    """
    check_bits(bits)
    if x.dim() < 2 or x_min.shape != (x.shape[1],) or x_max.shape != (x.shape[1],):
        raise ValueError(f"expected an activation [N, C, ...] and ranges of shape [C]; got {tuple(x.shape)}, "
                         f"{tuple(x_min.shape)} and {tuple(x_max.shape)}")
    range_shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    scale, zero_point = quant_params(x_min.to(x.dtype).view(range_shape), x_max.to(x.dtype).view(range_shape), bits)
    return StraightThrough.apply(x, fake_quantize, scale, zero_point, bits)


def weight_fake_quant(w: torch.Tensor, bits: int, granularity: str = "kernel") -> torch.Tensor:
    """Fake-quantize a weight with one range per kernel or per output channel.

    ``"kernel"``: one range per (out, in) kernel of a 4-D conv weight, per row of a 2-D weight
    (the official GranQ code, used for its published numbers). ``"channel"``: one range per output
    channel (the earlier methods). Gradient: straight-through.
    """
    if granularity == "kernel" and w.dim() == 4:
        return per_row_fake_quant(w, bits, leading_dims=2)
    if granularity in WEIGHT_GRANULARITIES:
        return per_row_fake_quant(w, bits, leading_dims=1)
    raise ValueError(f"weight granularity must be one of {WEIGHT_GRANULARITIES}, got {granularity!r}")
