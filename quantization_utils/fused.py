"""Fast path of the per-row quantizers: the functional core compiled by torch.compile, eager as fallback.

Eager :func:`~.functional.granq_fake_quant` runs a dozen separate tensor operations, each a full pass
over memory. Compiled, :func:`~.functional.grouped_values` becomes one loop over the (sample, channel)
rows that finds each row's min and max and writes the quantized row while it is still in cache. The
gradient is straight-through in both, so the backward pass costs nothing either way. The same kernel
serves the weights (one range per (out, in) kernel or per output channel), which are fake-quantized on
every forward.

:func:`granq_function` and :func:`weight_function` pick the implementation that ``impl`` names (the
``quant_impl`` config key):

- ``"eager"``: :func:`~.functional.granq_fake_quant` and :func:`~.functional.weight_fake_quant`.
- ``"compiled"``: the compiled function; raises if torch.compile fails or its values differ from eager.
- ``"auto"``: the compiled function where it works, else eager, with one warning that says why.

:func:`quant_path` says which of the two a run used.

The function is compiled once per process on the tensor viewed as rows in memory order ([N * C, H * W],
or [N, H * W, C] for channels_last), with every size dynamic: batch sizes, channel counts and
resolutions share one compilation per rank (a second one when the bit-width first changes, which then
becomes dynamic too; sizes of 1 are specialised, so rows of one element go to eager).

Equal values, bit for bit. On CUDA, Inductor's Triton code by default divides approximately and fuses
``scale * x - zero_point`` into one fused multiply-add, where eager divides with correct rounding and
rounds the product before subtracting. Either can change the last bit of ``scale * x - zero_point``; at
or next to a half, that sends ``round`` to the other neighbour: a grid step. The compilation therefore
asks Inductor for eager's numerics (:data:`EAGER_NUMERICS`, for this compilation only). A torch that
lacks those options gets the compiled path on the CPU, whose C++ code already computes as eager does,
and eager elsewhere. And the first call for each (role, rank, grouping, layout, bits, dtype, device),
the role being ``"activation"``, ``"kernel weight"`` or ``"channel weight"``, is checked against the
eager formula with ``torch.equal``, on the tensor itself and on a small tensor of the same kind whose
rows round exact halves (:func:`tie_tensor`): a compiler that changes the arithmetic is caught before
it can touch training.
"""

from __future__ import annotations

import functools
import logging
import math

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

__all__ = [
    "EAGER_NUMERICS",
    "QUANT_IMPLS",
    "CompiledGranQ",
    "check_impl",
    "compile_values",
    "eager_numerics_options",
    "granq_function",
    "grouped_call",
    "missing_eager_numerics",
    "quant_path",
    "tie_tensor",
    "weight_function",
]

QUANT_IMPLS = ("auto", "compiled", "eager")
# Inductor options (torch._inductor.config names) that make its Triton code compute as eager does:
# correctly rounded fp32 division (div_rn), and no fusion of a multiply and an add into one rounding.
EAGER_NUMERICS = ("eager_numerics.division_rounding", "emulate_precision_casts")

logger = logging.getLogger(__name__)


def missing_eager_numerics() -> list[str]:
    """The names of :data:`EAGER_NUMERICS` this torch's Inductor does not have (all of them without Inductor)."""
    try:
        from torch._inductor import config
        known = config.get_config_copy()
    except Exception:  # a build without Inductor: torch.compile fails later with its own message
        return list(EAGER_NUMERICS)
    return [name for name in EAGER_NUMERICS if name not in known]


def eager_numerics_options() -> dict[str, bool]:
    """``torch.compile`` options asking for eager's numerics; empty where this torch lacks any of them."""
    return {} if missing_eager_numerics() else dict.fromkeys(EAGER_NUMERICS, True)


@functools.cache
def compile_values(fn, eager_numerics: bool = True):
    """``torch.compile(fn)``, once per process; raises where torch.compile is unsupported.

    With ``eager_numerics`` (and where this torch has them) the compilation gets :func:`eager_numerics_options`
    as its ``options``: they apply to the compilations of this function only, not to the process's config.
    Compilation itself happens lazily, on the first call of the returned function.
    """
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("torch.compile is not supported on this platform")
    return torch.compile(fn, options=eager_numerics_options() if eager_numerics else None)


def grouped_call(values_fn, x: torch.Tensor, bits: int, leading_dims: int,
                 channels_last: bool | None = None) -> torch.Tensor:
    """``values_fn`` (:func:`~.functional.grouped_values` or its compiled version) on ``x`` viewed as rows.

    One range per index of the first ``leading_dims`` dimensions; no gradient rule, no checks.
    """
    if channels_last is None:
        channels_last = is_channels_last(x)
    # detach() drops the view's link to x (torch.compile would guard on x's own sizes too); the sizes
    # are marked dynamic rather than compiled with dynamic=True, whose "duck sizing" would compile
    # again for every new pattern of equal sizes (N == C, C_out == C_in, ...).
    groups = range_groups(x, leading_dims, channels_last).detach()
    for dim in range(groups.dim()):
        torch._dynamo.maybe_mark_dynamic(groups, dim)
    return range_ungroup(values_fn(groups, bits), x.shape, channels_last)


def tie_tensor(shape, leading_dims: int, bits: int, signed: bool, dtype=torch.float32, device="cpu",
               channels_last: bool = False) -> torch.Tensor:
    """A tensor whose rows (one per index of the first ``leading_dims`` dims) fake-quantize exact halves.

    Row r spans [-c, n - c] * 2**j with n = 2**bits - 1, j = r % 8 - 4, c = 0 (post-ReLU) or n // 2
    (``signed``, as weights are), and holds its two ends and the values (k / 2 - c) * 2**j for odd k.
    Then scale = 2**-j and ``scale * x - zero_point`` = k / 2 - 2**(bits - 1), all exact in float32
    and float16: every value but the ends is a tie of ``round``, which must go to the even neighbour.

    >>> x = tie_tensor((1, 9), 1, bits=2, signed=False)
    >>> (x * 16).tolist()  # j = -4
    [[0.0, 3.0, 0.5, 1.5, 2.5, 0.5, 1.5, 2.5, 0.5]]
    >>> granq_fake_quant(x, 2).mul(16).tolist()  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    [[0.0, 3.0, 0.0, 2.0, 2.0, 0.0, 2.0, 2.0, 0.0]]
    """
    n = 2**bits - 1
    rows, length = math.prod(shape[:leading_dims]), math.prod(shape[leading_dims:])
    index = torch.arange(length, dtype=torch.float64)
    halves = torch.where(index == 0, 0.0, torch.where(index == 1, 2.0 * n, (2 * index - 3) % (2 * n)))
    exponents = torch.arange(rows, dtype=torch.float64).remainder(8).sub(4).view(-1, 1)
    centre = n // 2 if signed else 0
    x = ((halves / 2 - centre) * torch.exp2(exponents)).to(dtype).reshape(shape).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# Shapes of the tie tensors by (rank, leading_dims): 23 * 23 = 529 values per row cover every half of an
# 8-bit grid; no size is 1 (which torch.compile would specialise) and sizes differ (so share no symbol).
TIE_SHAPES = {(2, 1): (8, 529), (4, 2): (2, 4, 23, 23), (4, 1): (8, 2, 23, 23)}


class CompiledGranQ:
    """Per-row fake quantizers from the compiled :func:`~.functional.grouped_values`, straight-through.

    Call it as ``(x, bits)`` for a GranQ activation; :meth:`weight` quantizes a weight. ``strict=True``
    (``impl = "compiled"``) raises where compilation fails or gives other values than eager;
    ``strict=False`` (``"auto"``) logs a warning and uses eager from then on. ``compiler`` maps the pure
    function to its compiled version (default :func:`compile_values`; tests pass a failing one).
    """

    def __init__(self, strict: bool = False, compiler=None):
        self.strict = strict
        self._compiler = compiler
        self._compiled = None
        self._verified: set[tuple] = set()  # keys of first calls checked against eager
        self.failure: str | None = None  # why eager is used, once the compiled path failed

    @property
    def impl(self) -> str:
        return "compiled" if self.strict else "auto"

    @property
    def uses_compiled(self) -> bool:
        """False once the compiled path failed and calls go to eager."""
        return self.failure is None

    @property
    def path(self) -> str:
        """``"compiled"`` once a call was verified and none failed, else ``"eager: <why>"``."""
        if self.failure is not None:
            return f"eager: {self.failure}"
        return "compiled" if self._verified else "eager: no call has used the compiled path yet"

    def __call__(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """:func:`~.functional.granq_fake_quant`: one range per (sample, channel) of [N, C, H, W], per row of [N, F]."""
        # Argument errors are the caller's: eager raises them, they are never taken for a compiler failure.
        check_bits(bits)
        if self.failure is not None or x.dim() not in (2, 4):
            return granq_fake_quant(x, bits)
        return self._quantize(x, bits, 2 if x.dim() == 4 else 1, "activation", granq_fake_quant)

    def weight(self, w: torch.Tensor, bits: int, granularity: str = "kernel") -> torch.Tensor:
        """:func:`~.functional.weight_fake_quant`: one range per (out, in) kernel or per output channel."""
        check_bits(bits)
        if self.failure is not None or granularity not in WEIGHT_GRANULARITIES or w.dim() not in (2, 4):
            return weight_fake_quant(w, bits, granularity)
        leading_dims = 2 if granularity == "kernel" and w.dim() == 4 else 1
        eager = functools.partial(weight_fake_quant, granularity=granularity)
        return self._quantize(w, bits, leading_dims, f"{granularity} weight", eager)

    def _quantize(self, x: torch.Tensor, bits: int, leading_dims: int, role: str, eager) -> torch.Tensor:
        if x.numel() == x.shape[:leading_dims].numel():  # rows of one element: not worth a compilation
            return eager(x, bits)
        channels_last = is_channels_last(x)
        # The role is part of the key: a weight and an activation of the same rank can share everything
        # else, and a check passed on weights says nothing about post-ReLU activations.
        key = (role, x.dim(), leading_dims, channels_last, bits, x.dtype, x.device)
        if key in self._verified:
            return StraightThrough.apply(x, self._values, bits, leading_dims, channels_last)
        return self._first_call(x, bits, leading_dims, channels_last, key, eager)

    def _values(self, x: torch.Tensor, bits: int, leading_dims: int, channels_last: bool) -> torch.Tensor:
        return grouped_call(self._compiled, x, bits, leading_dims, channels_last)

    def _first_call(self, x, bits, leading_dims, channels_last, key, eager) -> torch.Tensor:
        role = key[0]
        missing = missing_eager_numerics() if x.device.type != "cpu" else []
        if missing:
            names = ", ".join(f"torch._inductor.config.{name}" for name in missing)
            return self._fall_back(x, bits, eager, f"torch {torch.__version__} lacks {names}; compiled values "
                                                   f"could differ from eager on {x.device.type}")
        ties = tie_tensor(TIE_SHAPES[x.dim(), leading_dims], leading_dims, bits, role != "activation", x.dtype,
                          x.device, channels_last)
        try:
            if self._compiled is None:
                self._compiled = (self._compiler or compile_values)(grouped_values)
            y = StraightThrough.apply(x, self._values, bits, leading_dims, channels_last)
            with torch.no_grad():
                for name, values, expected in (("the input", y, eager(x.detach(), bits)),
                                               ("exact halves", self._values(ties, bits, leading_dims, channels_last),
                                                eager(ties, bits))):
                    if not torch.equal(values, expected):
                        raise ArithmeticError(f"its values differ from the eager formula on {name} ({role}, shape "
                                              f"{tuple(x.shape)}, bits {bits}, {x.dtype} on {x.device})")
        except Exception as error:  # compilers fail in many ways: no C++ compiler, no Triton, unsupported op
            return self._fall_back(x, bits, eager, f"{type(error).__name__}: {error}".strip().splitlines()[0], error)
        self._verified.add(key)
        return y

    def _fall_back(self, x, bits, eager, reason: str, error: Exception | None = None) -> torch.Tensor:
        if self.strict:
            raise RuntimeError(f"quant_impl = compiled, but the compiled GranQ quantizer failed ({reason}); "
                               f"set quant_impl = auto to fall back to eager, or eager to skip compiling") from error
        self.failure = reason
        logger.warning("the compiled GranQ quantizer failed (%s); using the eager one, which gives the same "
                       "values more slowly. Set quant_impl = eager to skip the attempt", reason)
        return eager(x, bits)

    def __reduce__(self):
        # Copies and pickles (deepcopy of a student, torch.save of a model) share the process's instance.
        return granq_function, (self.impl,)

    def __repr__(self) -> str:
        state = "compiled" if self.failure is None else f"eager fallback: {self.failure}"
        return f"CompiledGranQ(impl={self.impl!r}, {state})"


_SHARED: dict[str, CompiledGranQ] = {}


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation (:data:`QUANT_IMPLS`), else ValueError."""
    if impl not in QUANT_IMPLS:
        raise ValueError(f"quant_impl must be one of {QUANT_IMPLS}, got {impl!r}")
    return impl


def granq_function(impl: str = "auto"):
    """The GranQ activation quantizer ``(x, bits) -> y`` of implementation ``impl``; one shared instance per impl.

    >>> granq_function("eager") is granq_fake_quant
    True
    """
    if check_impl(impl) == "eager":
        return granq_fake_quant
    if impl not in _SHARED:
        _SHARED[impl] = CompiledGranQ(strict=impl == "compiled")
    return _SHARED[impl]


def weight_function(impl: str = "auto"):
    """The weight quantizer ``(w, bits, granularity) -> y`` of implementation ``impl``.

    >>> weight_function("eager") is weight_fake_quant
    True
    """
    if check_impl(impl) == "eager":
        return weight_fake_quant
    return granq_function(impl).weight


def quant_path(impl: str = "auto") -> str:
    """Which implementation the quantizers of implementation ``impl`` used in this process, and why not the other.

    ``"compiled"`` once a call of the compiled path was verified against eager and none failed, else
    ``"eager: <reason>"``.

    >>> quant_path("eager")
    'eager: quant_impl = eager'
    """
    if check_impl(impl) == "eager":
        return "eager: quant_impl = eager"
    if impl not in _SHARED:
        return "eager: no call has used the compiled path yet"
    return _SHARED[impl].path
