"""Fast path of the GranQ activation quantizer: the functional core compiled by torch.compile, eager as fallback.

Eager :func:`~.functional.granq_fake_quant` runs a dozen separate tensor operations, each a full pass
over memory. Compiled, :func:`~.functional.grouped_values` becomes one loop over the (sample, channel)
rows that finds each row's min and max and writes the quantized row while it is still in cache. The
gradient is straight-through in both, so the backward pass costs nothing either way.

:func:`granq_function` picks the implementation named by the ``granq_impl`` config key:

- ``"eager"``: :func:`~.functional.granq_fake_quant`.
- ``"compiled"``: the compiled function; raises if torch.compile fails or its values differ from eager.
- ``"auto"``: the compiled function where it works, else eager, with one warning that says why.

The function is compiled once per process with dynamic shapes, on the activation viewed as 3-D groups
([N * C, H * W, 1], or [N, H * W, C] for channels_last), so every batch size, channel count and
resolution shares one compilation per memory layout (torch specialises sizes 0 and 1 and sizes that
happen to be equal, so e.g. a row of one element compiles once more). The first call for each (rank, bits, dtype,
device) is checked against the eager formula with ``torch.equal``: a compiler that changes the
arithmetic is caught before it can touch training.
"""

from __future__ import annotations

import functools
import logging

import torch

from .functional import StraightThrough, check_bits, granq_fake_quant, granq_groups, granq_ungroup, grouped_values

__all__ = ["GRANQ_IMPLS", "CompiledGranQ", "granq_function"]

GRANQ_IMPLS = ("auto", "compiled", "eager")

logger = logging.getLogger(__name__)


@functools.cache
def compile_values(fn):
    """``torch.compile(fn, dynamic=True)``, once per process; raises where torch.compile is unsupported.

    Compilation itself happens lazily, on the first call of the returned function.
    """
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("torch.compile is not supported on this platform")
    return torch.compile(fn, dynamic=True)


class CompiledGranQ:
    """``(x, bits) -> y``: GranQ values from the compiled :func:`~.functional.grouped_values`, straight-through.

    ``strict=True`` (``granq_impl = "compiled"``) raises where compilation fails or gives other values than
    eager; ``strict=False`` (``"auto"``) logs a warning and uses eager from then on. ``compiler`` maps the
    pure function to its compiled version (default :func:`compile_values`; tests pass a failing one).
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
        # Argument errors are the caller's: eager raises them, they are never taken for a compiler failure.
        check_bits(bits)
        if self.failure is not None or x.dim() not in (2, 4):
            return granq_fake_quant(x, bits)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        key = (x.dim(), channels_last, bits, x.dtype, x.device)  # one compiled kernel per rank and layout
        if key in self._verified:
            return StraightThrough.apply(x, self._values, bits)
        return self._first_call(x, bits, key)

    def _values(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        # detach() drops the view's link to x: torch.compile would otherwise guard on x's own shape, and
        # every new ([N, C, H, W] with N == C, H == W, ...) pattern would compile again.
        return granq_ungroup(self._compiled(granq_groups(x).detach(), bits), x.shape)

    def _first_call(self, x: torch.Tensor, bits: int, key: tuple) -> torch.Tensor:
        try:
            if self._compiled is None:
                self._compiled = (self._compiler or compile_values)(grouped_values)
            y = StraightThrough.apply(x, self._values, bits)
            with torch.no_grad():
                if not torch.equal(y, granq_fake_quant(x.detach(), bits)):
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
            return granq_fake_quant(x, bits)
        self._verified.add(key)
        return y

    def __reduce__(self):
        # Copies and pickles (deepcopy of a student, torch.save of a model) share the process's instance.
        return granq_function, (self.impl,)

    def __repr__(self) -> str:
        state = "compiled" if self.failure is None else f"eager fallback: {self.failure}"
        return f"CompiledGranQ(impl={self.impl!r}, {state})"


_SHARED: dict[str, CompiledGranQ] = {}


def granq_function(impl: str = "auto"):
    """The GranQ quantizer ``(x, bits) -> y`` for ``granq_impl = impl``; one shared instance per impl.

    >>> granq_function("eager") is granq_fake_quant
    True
    """
    if impl not in GRANQ_IMPLS:
        raise ValueError(f"granq_impl must be one of {GRANQ_IMPLS}, got {impl!r}")
    if impl == "eager":
        return granq_fake_quant
    if impl not in _SHARED:
        _SHARED[impl] = CompiledGranQ(strict=impl == "compiled")
    return _SHARED[impl]
