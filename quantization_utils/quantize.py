"""Model surgery: turn a float model into a fake-quantized student."""

from __future__ import annotations

import copy
import functools

import torch.nn as nn

from .modules import QuantAct, QuantConv2d, QuantLinear, WeightQuant

__all__ = ["ACTIVATIONS", "STUDENT_KEYS", "count_modules", "quantize_model", "rebuild_student", "set_act_tracking"]

# Activations followed by a QuantAct. Their outputs are what the next layer's integer kernel reads.
ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _quantize_children(module: nn.Module, weight_quant: WeightQuant, make_act) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            replacement = QuantConv2d.from_float(child, weight_quant)
        elif isinstance(child, nn.Linear):
            replacement = QuantLinear.from_float(child, weight_quant)
        elif isinstance(child, ACTIVATIONS):
            replacement = nn.Sequential(child, make_act())
        else:
            _quantize_children(child, weight_quant, make_act)
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
    weight_quant = WeightQuant(weight_bits, weight_granularity, granq_impl)
    make_act = functools.partial(QuantAct, act_bits, act_mode, granq_impl=granq_impl)
    make_act()  # bad activation settings fail here, whether or not the model has activations
    if isinstance(model, (nn.Conv2d, nn.Linear) + ACTIVATIONS):
        raise TypeError("quantize_model expects a network that contains layers, not a single layer")
    quantized = copy.deepcopy(model)
    _quantize_children(quantized, weight_quant, make_act)
    return quantized


# The options that define a student's architecture and quantizers; every other option only affects
# how it was trained or evaluated.
STUDENT_KEYS = ("qw", "qa", "act_mode", "weight_granularity")


def rebuild_student(float_model: nn.Module, options: dict, state_dict: dict) -> nn.Module:
    """The quantized student that ``state_dict`` was saved from, in eval mode, on the device of its tensors.

    ``float_model`` has the student's float architecture (its weights are replaced); ``options`` are the
    run's options as a dict, of which ``qw``, ``qa``, ``act_mode``, ``weight_granularity`` and, where
    present, ``granq_impl`` are used. Tracked activation ranges (layer-wise, channel-wise) come from
    ``state_dict`` and are frozen, as the trainer freezes them for evaluation. Raises ValueError when something
    does not fit.
    """
    missing = [key for key in STUDENT_KEYS if key not in options]
    if missing:
        raise ValueError(f"the saved options lack {', '.join(missing)}; cannot rebuild the student")
    student = quantize_model(float_model, options["qw"], options["qa"], options["act_mode"],
                             options["weight_granularity"], granq_impl=options.get("granq_impl", "auto"))
    try:
        student.load_state_dict(state_dict)
    except RuntimeError as error:
        settings = ", ".join(f"{key}={options[key]}" for key in STUDENT_KEYS)
        raise ValueError(f"the saved student does not fit the float model quantized with {settings}: "
                         f"{error}") from None
    set_act_tracking(student, False)
    # Where torch.load put the saved tensors (its map_location) is where the student should live.
    device = next(iter(state_dict.values())).device
    return student.to(device).eval()


def set_act_tracking(model: nn.Module, tracking: bool) -> None:
    """Unfreeze (``True``) or freeze (``False``) the tracked activation ranges of ``model``."""

    def apply(module: nn.Module) -> None:
        if isinstance(module, QuantAct):
            module.unfix() if tracking else module.fix()

    model.apply(apply)


def count_modules(model: nn.Module, types) -> int:
    """Number of submodules of ``model`` that are instances of ``types``."""
    return sum(isinstance(m, types) for m in model.modules())
