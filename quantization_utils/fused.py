"""Fast path of the per-row quantizers: the functional core compiled by torch.compile, eager as fallback.

Eager :func:`~.functional.granq_fake_quant` runs a dozen separate tensor operations, each a full pass
over memory. Compiled, :func:`~.functional.grouped_values` becomes one loop over the (sample, channel)
rows that finds each row's min and max and writes the quantized row while it is still in cache. The
gradient is straight-through in both, so the backward pass costs nothing either way. The same kernel
serves the weights (one range per (out, in) kernel or per output channel), which are fake-quantized on
every forward.

:func:`granq_function` and :func:`weight_function` pick the implementation named by the ``granq_impl``
config key:

- ``"eager"``: :func:`~.functional.granq_fake_quant` and :func:`~.functional.weight_fake_quant`.
- ``"compiled"``: the compiled function; raises if torch.compile fails or its values differ from eager.
- ``"auto"``: the compiled function where it works, else eager, with one warning that says why.

The function is compiled once per process on the tensor viewed as rows in memory order ([N * C, H * W],
or [N, H * W, C] for channels_last), with every size dynamic: batch sizes, channel counts and
resolutions share one compilation per rank (a second one when the bit-width first changes, which then
becomes dynamic too; sizes of 1 are specialised, so rows of one element go to eager). The first call
for each (rank, grouping, layout, bits, dtype, device) is checked against the eager formula with
``torch.equal``: a compiler that changes the arithmetic is caught before it can touch training.
"""

from __future__ import annotations

import functools
import logging

import torch

from .functional import (
    WEIGHT_GRANULARITIES,
    StraightThrough,
    check_bits,
    granq_fake_quant,
    grouped_values,
    is_channels_last,
    range_groups,
    range_ungroup,
    weight_fake_quant,
)

__all__ = ["GRANQ_IMPLS", "CompiledGranQ", "granq_function", "weight_function"]

GRANQ_IMPLS = ("auto", "compiled", "eager")

logger = logging.getLogger(__name__)


@functools.cache
def compile_values(fn):
    """``torch.compile(fn)``, once per process; raises where torch.compile is unsupported.

    Compilation itself happens lazily, on the first call of the returned function.
    """
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("torch.compile is not supported on this platform")
    return torch.compile(fn)


class CompiledGranQ:
    """Per-row fake quantizers from the compiled :func:`~.functional.grouped_values`, straight-through.

    Call it as ``(x, bits)`` for a GranQ activation; :meth:`weight` quantizes a weight. ``strict=True``
    (``granq_impl = "compiled"``) raises where compilation fails or gives other values than eager;
    ``strict=False`` (``"auto"``) logs a warning and uses eager from then on. ``compiler`` maps the pure
    function to its compiled version (default :func:`compile_values`; tests pass a failing one).
    """

    def __init__(self, strict: bool = False, compiler=None):
        self.strict = strict
        self._compiler = compiler
        self._compiled = None
        self._verified: set[tuple] = set()
        self.failure: str | None = None  # why eager is used, once the compiled path failed

    @property
    def impl(self) -> str:
        return "compiled" if self.strict else "auto"

    @property
    def uses_compiled(self) -> bool:
        """False once the compiled path failed and calls go to eager."""
        return self.failure is None

    def __call__(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """:func:`~.functional.granq_fake_quant`: one range per (sample, channel) of [N, C, H, W], per row of [N, F]."""
        # Argument errors are the caller's: eager raises them, they are never taken for a compiler failure.
        check_bits(bits)
        if self.failure is not None or x.dim() not in (2, 4):
            return granq_fake_quant(x, bits)
        return self._quantize(x, bits, 2 if x.dim() == 4 else 1, granq_fake_quant)

    def weight(self, w: torch.Tensor, bits: int, granularity: str = "kernel") -> torch.Tensor:
        """:func:`~.functional.weight_fake_quant`: one range per (out, in) kernel or per output channel."""
        check_bits(bits)
        if self.failure is not None or granularity not in WEIGHT_GRANULARITIES or w.dim() not in (2, 4):
            return weight_fake_quant(w, bits, granularity)
        leading_dims = 2 if granularity == "kernel" and w.dim() == 4 else 1
        return self._quantize(w, bits, leading_dims, functools.partial(weight_fake_quant, granularity=granularity))

    def _quantize(self, x: torch.Tensor, bits: int, leading_dims: int, eager) -> torch.Tensor:
        if x.numel() == x.shape[:leading_dims].numel():  # rows of one element: not worth a compilation
            return eager(x, bits)
        channels_last = is_channels_last(x)
        key = (x.dim(), leading_dims, channels_last, bits, x.dtype, x.device)
        if key in self._verified:
            return StraightThrough.apply(x, self._values, bits, leading_dims, channels_last)
        return self._first_call(x, bits, leading_dims, channels_last, key, eager)

    def _values(self, x: torch.Tensor, bits: int, leading_dims: int, channels_last: bool) -> torch.Tensor:
        # detach() drops the view's link to x (torch.compile would guard on x's own sizes too); the sizes
        # are marked dynamic rather than compiled with dynamic=True, whose "duck sizing" would compile
        # again for every new pattern of equal sizes (N == C, C_out == C_in, ...).
        groups = range_groups(x, leading_dims, channels_last).detach()
        for dim in range(groups.dim()):
            torch._dynamo.maybe_mark_dynamic(groups, dim)
        return range_ungroup(self._compiled(groups, bits), x.shape, channels_last)

    def _first_call(self, x, bits, leading_dims, channels_last, key, eager) -> torch.Tensor:
        try:
            if self._compiled is None:
                self._compiled = (self._compiler or compile_values)(grouped_values)
            y = StraightThrough.apply(x, self._values, bits, leading_dims, channels_last)
            with torch.no_grad():
                if not torch.equal(y, eager(x.detach(), bits)):
                    raise ArithmeticError(f"its values differ from the eager formula (shape {tuple(x.shape)}, "
                                          f"bits {bits}, {x.dtype} on {x.device})")
        except Exception as error:  # compilers fail in many ways: no C++ compiler, no Triton, unsupported op
            reason = f"{type(error).__name__}: {error}".strip().splitlines()[0]
            if self.strict:
                raise RuntimeError(f"granq_impl = compiled, but the compiled GranQ quantizer failed ({reason}); "
                                   f"set granq_impl = auto to fall back to eager, or eager to skip compiling"
                                   ) from error
            self.failure = reason
            logger.warning("the compiled GranQ quantizer failed (%s); using the eager one, which gives the same "
                           "values more slowly. Set granq_impl = eager to skip the attempt", reason)
            return eager(x, bits)
        self._verified.add(key)
        return y

    def __reduce__(self):
        # Copies and pickles (deepcopy of a student, torch.save of a model) share the process's instance.
        return granq_function, (self.impl,)

    def __repr__(self) -> str:
        state = "compiled" if self.failure is None else f"eager fallback: {self.failure}"
        return f"CompiledGranQ(impl={self.impl!r}, {state})"


_SHARED: dict[str, CompiledGranQ] = {}


def _check_impl(impl: str) -> str:
    if impl not in GRANQ_IMPLS:
        raise ValueError(f"granq_impl must be one of {GRANQ_IMPLS}, got {impl!r}")
    return impl


def granq_function(impl: str = "auto"):
    """The GranQ activation quantizer ``(x, bits) -> y`` for ``granq_impl = impl``; one shared instance per impl.

    >>> granq_function("eager") is granq_fake_quant
    True
    """
    if _check_impl(impl) == "eager":
        return granq_fake_quant
    if impl not in _SHARED:
        _SHARED[impl] = CompiledGranQ(strict=impl == "compiled")
    return _SHARED[impl]


def weight_function(impl: str = "auto"):
    """The weight quantizer ``(w, bits, granularity) -> y`` for ``granq_impl = impl``.

    >>> weight_function("eager") is weight_fake_quant
    True
    """
    if _check_impl(impl) == "eager":
        return weight_fake_quant
    return granq_function(impl).weight
