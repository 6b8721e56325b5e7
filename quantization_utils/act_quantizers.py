"""Activation quantizers as plug-ins: the ``act_mode`` of a :class:`~.modules.QuantAct` names an entry here.

A quantizer is registered with one decorated function or class whose docstring states its formula:

- a function ``f(x, bits) -> y`` for a quantizer without state (its ranges come from ``x`` itself);
- a subclass of :class:`ActQuantizer` for one with settings or state. The QuantAct ``act`` holds them
  (``act.quant``, its :class:`~.modules.ActQuant`: ``bits``, ``momentum``, ...; ``act.tracking``) and calls
  ``quantizer(act, x)``; ``init_state(act)`` registers the buffers the quantizer keeps on ``act``, so that a
  student's state_dict names them after the QuantAct. :meth:`ActQuantizer.from_spec` makes the instance of a
  QuantAct from its ``ActQuant``: a quantizer with several implementations picks and holds its own there.

    >>> @register_act_quantizer("sign_example")
    ... def sign_example(x, bits):
    ...     '''y = sign(x), whatever the bit-width.'''
    ...     return torch.sign(x)
    >>> "sign_example" in act_quantizer_names()
    True
    >>> del ACT_QUANTIZERS["sign_example"]

Built in: ``granq`` (one range per (sample, channel)), ``layerwise`` (one tracked range per layer) and
``channel`` (one tracked range per channel). The tracked ones (``tracks_ranges``) follow the same rule:
a bias-corrected exponential moving average of the batch ranges while ``act.tracking``, frozen otherwise.
Under ``torch.distributed`` the batch ranges are first reduced over the processes, so that every process
tracks the same ranges whether or not a DDP forward broadcasts buffers (it does not under ``no_grad`` or
``no_sync``).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from .functional import channel_fake_quant, channel_range, granq_fake_quant, layerwise_fake_quant
from .fused import granq_function
from .registry import Registry

__all__ = ["ACT_QUANTIZERS", "ActQuantizer", "ChannelRange", "GranQ", "LayerwiseRange", "TrackedRange",
           "act_quantizer_names", "all_reduce_range", "make_act_quantizer", "register_act_quantizer"]

class ActQuantizer:
    """Base of the registered quantizer classes. An instance belongs to one QuantAct and holds at most the
    function that computes it: settings and state live on the QuantAct, which passes itself to every call."""

    tracks_ranges = False  # True: ranges tracked while act.tracking, which must be calibrated before use

    @classmethod
    def from_spec(cls, quant) -> "ActQuantizer":
        """The instance for a QuantAct of :class:`~.modules.ActQuant` ``quant``."""
        return cls()

    def init_state(self, act) -> None:
        """Register the quantizer's buffers on ``act``."""

    def load_state(self, act, state_dict: dict, prefix: str) -> None:
        """Prepare ``act``'s buffers for loading ``state_dict`` (e.g. size them); called before loading."""

    def __call__(self, act, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self, act) -> str:
        """Text appended to the QuantAct's ``extra_repr``."""
        return ""


# name -> the registered function or ActQuantizer subclass, in order of registration
ACT_QUANTIZERS = Registry("activation quantizer", ActQuantizer, "its formula")


class _FunctionQuantizer(ActQuantizer):
    """A registered function ``f(x, bits)``: no state."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, act, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, act.quant.bits)


def register_act_quantizer(name: str):
    """Decorator registering an activation quantizer (a function ``f(x, bits)`` or an :class:`ActQuantizer`
    subclass) under ``name``; its docstring must state the formula."""
    return ACT_QUANTIZERS.register(name)


def act_quantizer_names() -> tuple[str, ...]:
    """The registered ``act_mode`` names, in order of registration."""
    return ACT_QUANTIZERS.names()


def make_act_quantizer(quant) -> ActQuantizer:
    """A new instance of the quantizer registered as ``quant.mode`` for the :class:`~.modules.ActQuant`
    ``quant``; :class:`~.registry.UnknownNameError` listing the names if there is none."""
    entry = ACT_QUANTIZERS[quant.mode]
    return entry.from_spec(quant) if inspect.isclass(entry) else _FunctionQuantizer(entry)


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise min of ``lo`` and max of ``hi`` over the processes of ``torch.distributed``, if initialised.

    One collective: the max of (-lo, hi); negation is exact, so -max(-lo) is the min of lo.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lo, hi
    both = torch.cat([-lo.reshape(-1), hi.reshape(-1)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    low, high = both.chunk(2)
    return (-low).view_as(lo), high.view_as(hi)


@register_act_quantizer("granq")
class GranQ(ActQuantizer):
    """GranQ: one range per (sample, channel), from the activation itself, all channels at once.

    For x[n, c] over H x W (a row of [N, F]): lo, hi = min, max; s = (2**b - 1) / (hi - lo);
    z = round(s * lo) + 2**(b-1); y = (round(s * x - z) + z) / s. Gradient: straight-through.
    Computed by ``fn``, the implementation that ``ActQuant.impl`` names (:func:`~.fused.granq_function`);
    all give the same values.
    """

    def __init__(self, fn=granq_fake_quant):
        self.fn = fn

    @classmethod
    def from_spec(cls, quant) -> "GranQ":
        return cls(granq_function(quant.impl))

    def __call__(self, act, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, act.quant.bits)

    def extra_repr(self, act) -> str:
        return f", quant_impl={act.quant.impl}"


class TrackedRange(ActQuantizer):
    """Ranges that are a bias-corrected exponential moving average of the batch ranges.

    While ``act.tracking``, every forward first updates, with m = ``act.quant.momentum`` and the batch range
    (lo, hi) (reduced over the processes under torch.distributed):
    running_min = m * running_min + (1 - m) * lo (likewise running_max with hi), momentum_power *= m,
    x_min = running_min / (1 - momentum_power), x_max = running_max / (1 - momentum_power).
    Then x is fake-quantized with [x_min, x_max], frozen or not. Subclasses give the batch range and the values.
    """

    tracks_ranges = True
    # Their names and order are those of the saved students.
    STATE_BUFFERS = ("running_min", "running_max", "momentum_power", "x_min", "x_max")
    RANGE_BUFFERS = ("running_min", "running_max", "x_min", "x_max")  # of initial_shape; momentum_power is a scalar
    initial_shape: tuple = ()  # of the range buffers

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def values(self, x: torch.Tensor, bits: int, x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_state(self, act) -> None:
        # Raw moving averages and momentum**steps; the range used is their bias-corrected ratio.
        for name in self.STATE_BUFFERS:
            act.register_buffer(name, torch.ones(()) if name == "momentum_power" else torch.zeros(self.initial_shape))

    @torch.no_grad()
    def track(self, act, x: torch.Tensor) -> None:
        lo, hi = all_reduce_range(*self.batch_range(x.detach()))
        m = act.quant.momentum
        act.running_min.mul_(m).add_(lo.to(act.running_min.dtype), alpha=1 - m)
        act.running_max.mul_(m).add_(hi.to(act.running_max.dtype), alpha=1 - m)
        act.momentum_power.mul_(m)
        correction = 1 - act.momentum_power
        torch.div(act.running_min, correction, out=act.x_min)
        torch.div(act.running_max, correction, out=act.x_max)

    def __call__(self, act, x: torch.Tensor) -> torch.Tensor:
        if act.tracking:
            self.track(act, x)
        return self.values(x, act.quant.bits, act.x_min, act.x_max)


@register_act_quantizer("layerwise")
class LayerwiseRange(TrackedRange):
    """One range per layer (GDFQ): [x_min, x_max] tracked from the (min, max) of each whole batch.

    y = (clamp(round(s * x - z), -2**(b-1), 2**(b-1) - 1) + z) / s with s, z of [x_min, x_max]
    (:func:`~.functional.layerwise_fake_quant`); gradient straight-through. Tracking: :class:`TrackedRange`.
    Until the first tracked batch the range is empty and the output meaningless: calibrate before use.
    """

    def batch_range(self, x):
        return torch.aminmax(x)

    def values(self, x, bits, x_min, x_max):
        return layerwise_fake_quant(x, bits, x_min, x_max)


@register_act_quantizer("channel")
class ChannelRange(TrackedRange):
    """One range per channel (the conventional channel-wise quantizer): [x_min[c], x_max[c]] tracked from the
    (min, max) of channel c over N, H, W of each batch, shared by all samples.

    y[n, c] = (clamp(round(s_c * x - z_c), -2**(b-1), 2**(b-1) - 1) + z_c) / s_c with s_c, z_c of
    [x_min[c], x_max[c]] (:func:`~.functional.channel_fake_quant`); gradient straight-through. Tracking:
    :class:`TrackedRange`, per channel. The range buffers have shape [C]: empty until the first tracked
    batch or a loaded state_dict sizes them.
    """

    initial_shape = (0,)

    def batch_range(self, x):
        return channel_range(x)

    def track(self, act, x):
        if x.dim() >= 2 and act.x_min.numel() == 0:
            self._resize(act, x.shape[1])
        elif x.dim() >= 2 and act.x_min.numel() != x.shape[1]:
            raise ValueError(f"this QuantAct tracks {act.x_min.numel()} channel ranges but got an activation of "
                             f"shape {tuple(x.shape)}: a channel-wise quantizer needs one QuantAct per position")
        super().track(act, x)

    def values(self, x, bits, x_min, x_max):
        if x_min.numel() == 0:
            raise RuntimeError("the channel ranges of this QuantAct are empty: track them first (unfix() and run "
                               "batches, as the trainer's calibration does) or load them from a state_dict")
        return channel_fake_quant(x, bits, x_min, x_max)

    @staticmethod
    def _resize(act, channels: int) -> None:
        for name in TrackedRange.RANGE_BUFFERS:
            old = getattr(act, name)
            setattr(act, name, torch.zeros(channels, dtype=old.dtype, device=old.device))

    def load_state(self, act, state_dict, prefix):
        saved = state_dict.get(prefix + "x_min")
        # The ranges take the saved size where either side is still empty: a state saved before the first tracked
        # batch empties them again, so that a restored trainer is the one that was saved. Two sized ranges must
        # match, as load_state_dict checks.
        if (isinstance(saved, torch.Tensor) and saved.dim() == 1 and saved.numel() != act.x_min.numel()
                and 0 in (saved.numel(), act.x_min.numel())):
            self._resize(act, saved.numel())
