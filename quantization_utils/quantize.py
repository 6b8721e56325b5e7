"""Model surgery: turn a float model into a fake-quantized student."""

from __future__ import annotations

import contextlib
import copy
import functools
import typing

import torch
import torch.nn as nn

from .fused import weight_function
from .modules import QuantAct, QuantConv2d, QuantLinear, WeightQuant

__all__ = ["ACTIVATIONS", "ACT_TYPES", "DEFAULT_ACT_TYPES", "STUDENT_KEYS", "activation_classes", "count_modules",
           "has_tracked_ranges", "quantize_model", "rebuild_student", "set_act_tracking", "shared_act_quantizers",
           "unquantized_inputs"]

# The activation modules that ``act_types`` may name. Each one found is followed by a QuantAct, whose output
# is what the next layer's integer kernel reads.
ACT_TYPES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
             "leaky_relu": nn.LeakyReLU}
DEFAULT_ACT_TYPES = ("relu", "relu6")  # as the official code
ACTIVATIONS = (nn.ReLU, nn.ReLU6)  # the classes of DEFAULT_ACT_TYPES


# pytorchcv's own modules for the same functions (its MobileNetV3, EfficientNet, ...), where it is installed.
_PYTORCHCV_EQUIVALENTS = {"hardswish": "HSwish", "silu": "Swish"}


def _pytorchcv_equivalent(name: str) -> list[type]:
    if name not in _PYTORCHCV_EQUIVALENTS:
        return []
    try:
        from pytorchcv.models.common import activ
    except ImportError:
        return []
    return [getattr(activ, _PYTORCHCV_EQUIVALENTS[name])]


def activation_classes(act_types: typing.Iterable[str | type]) -> tuple[type, ...]:
    """The module classes of ``act_types``: names from :data:`ACT_TYPES` (``hardswish`` and ``silu`` also
    take pytorchcv's HSwish and Swish) or ``nn.Module`` subclasses.

    >>> activation_classes(["relu6", nn.GELU])
    (<class 'torch.nn.modules.activation.ReLU6'>, <class 'torch.nn.modules.activation.GELU'>)
    """
    classes = []
    for kind in act_types:
        if isinstance(kind, type) and issubclass(kind, nn.Module):
            classes.append(kind)
        elif kind in ACT_TYPES:
            classes += [ACT_TYPES[kind]] + _pytorchcv_equivalent(kind)
        else:
            raise ValueError(f"unknown activation type {kind!r}; choose from {', '.join(ACT_TYPES)} "
                             f"or give an nn.Module class")
    return tuple(classes)


def _quantize_children(module: nn.Module, weight_quant: WeightQuant, make_act, activations: tuple) -> None:
    for name, child in module.named_children():
        # Exact types: a subclass computes something else (masked, binary or octave convolutions) and stays float.
        if type(child) is nn.Conv2d:
            replacement = QuantConv2d.from_float(child, weight_quant)
        elif type(child) is nn.Linear:
            replacement = QuantLinear.from_float(child, weight_quant)
        elif isinstance(child, activations):
            replacement = nn.Sequential(child, make_act())
        else:
            _quantize_children(child, weight_quant, make_act, activations)
            continue
        setattr(module, name, replacement)


def quantize_model(model: nn.Module, weight_bits: int, act_bits: int, act_mode: str = "granq",
                   weight_granularity: str = "kernel", granq_impl: str = "auto",
                   act_types: typing.Iterable[str | type] = DEFAULT_ACT_TYPES) -> nn.Module:
    """Return a fake-quantized copy of ``model``; ``model`` itself is not modified.

    Every Conv2d and Linear (not their subclasses, which keep their own forward and float weights) becomes a
    QuantConv2d / QuantLinear with ``weight_bits``; every activation module
    of ``act_types`` (names of :data:`ACT_TYPES` or classes; ReLU and ReLU6 by default) is followed by a
    QuantAct with ``act_bits`` and ``act_mode``. BatchNorm stays in float and the input image is not
    quantized. ``granq_impl`` picks the implementation of the activation and weight quantizers: ``auto``
    (compiled where torch.compile works, else eager), ``compiled`` or ``eager``; all give the same values.
    """
    activations = activation_classes(act_types)
    weight_quant = WeightQuant(weight_bits, weight_granularity, granq_impl)
    make_act = functools.partial(QuantAct, act_bits, act_mode, granq_impl=granq_impl)
    make_act()  # bad activation settings fail here, whether or not the model has activations
    if isinstance(model, (nn.Conv2d, nn.Linear) + activations):
        raise TypeError("quantize_model expects a network that contains layers, not a single layer")
    quantized = copy.deepcopy(model)
    _quantize_children(quantized, weight_quant, make_act, activations)
    return quantized


# The options that define a student's architecture and quantizers; every other option only affects
# how it was trained or evaluated.
STUDENT_KEYS = ("qw", "qa", "act_mode", "weight_granularity")


def rebuild_student(float_model: nn.Module, options: dict, state_dict: dict) -> nn.Module:
    """The quantized student that ``state_dict`` was saved from, in eval mode, on the device of its tensors.

    ``float_model`` has the student's float architecture (its weights are replaced); ``options`` are the
    run's options as a dict, of which ``qw``, ``qa``, ``act_mode``, ``weight_granularity`` and, where
    present, ``granq_impl`` and ``act_types`` (ReLU and ReLU6 where absent, as before it existed) are used.
    Tracked activation ranges (layer-wise, channel-wise) come from ``state_dict`` and are frozen, as the trainer
    freezes them for evaluation. Raises ValueError when something does not fit.
    """
    missing = [key for key in STUDENT_KEYS if key not in options]
    if missing:
        raise ValueError(f"the saved options lack {', '.join(missing)}; cannot rebuild the student")
    act_types = options.get("act_types", DEFAULT_ACT_TYPES)
    student = quantize_model(float_model, options["qw"], options["qa"], options["act_mode"],
                             options["weight_granularity"], options.get("granq_impl", "auto"), act_types)
    try:
        student.load_state_dict(state_dict)
    except RuntimeError as error:
        settings = ", ".join([f"{key}={options[key]}" for key in STUDENT_KEYS] + [f"act_types={list(act_types)}"])
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


def has_tracked_ranges(model: nn.Module) -> bool:
    """Whether any activation quantizer of ``model`` tracks ranges (layer-wise, channel-wise), which must be
    calibrated before use."""
    return any(isinstance(m, QuantAct) and m.tracks_ranges for m in model.modules())


def count_modules(model: nn.Module, types) -> int:
    """Number of submodules of ``model`` that are instances of ``types``."""
    return sum(isinstance(m, types) for m in model.modules())


# Modules whose output holds only values of their input: what a QuantAct produced stays on its grid.
_GRID_KEEPING = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d)


@contextlib.contextmanager
def _inspected(student: nn.Module):
    """``student`` in eval mode with its activation quantizers passing their input through and its weight
    quantizers in eager mode, for a forward that only looks at where values go; restored afterwards.

    Only where each QuantAct's output goes matters then, not its values (a range not yet tracked may even
    be empty): a copy of its input stands in for its output, and no range is updated.
    """
    weight_fns = {}  # the weight quantizers swapped for eager ones, to restore
    passed_through = []
    was_training = student.training
    try:
        for module in student.modules():
            if isinstance(module, QuantAct):
                module.forward = torch.clone
                passed_through.append(module)
            elif isinstance(module, (QuantConv2d, QuantLinear)):
                weight_fns[module] = module.weight_fn
                module.weight_fn = weight_function("eager")
        student.eval()
        with torch.no_grad():
            yield student
    finally:
        student.train(was_training)
        for module in passed_through:
            del module.forward
        for module, weight_fn in weight_fns.items():
            module.weight_fn = weight_fn


def unquantized_inputs(student: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv2d / Linear layers of ``student`` that read an input no QuantAct produced, in call order.

    One eval-mode forward of ``example`` with hooks. An input counts as quantized when it is (a view of) the
    unmodified output of a QuantAct, or of a module in ``_GRID_KEEPING`` (max pooling, flatten, dropout, ...)
    that read one. Anything computed in between (a sum, an average pooling, a concatenation) is not on a
    quantization grid, so the layer that reads it works on float values; the first layer, which reads the
    image, is always listed. A layer called several times is listed if any call reads such an input.
    The student is left as it was (see :func:`_inspected`).
    """
    # Storage address -> (the tensor, kept alive so that no address is reused; its version counter then).
    quantized: dict[int, tuple[torch.Tensor, int]] = {}

    def is_quantized(x) -> bool:
        if not isinstance(x, torch.Tensor) or x.untyped_storage().data_ptr() not in quantized:
            return False
        # An in-place change after the quantizer bumps the version counter, which views share: off the grid.
        return x._version == quantized[x.untyped_storage().data_ptr()][1]

    def mark(module, inputs, output):
        if isinstance(output, torch.Tensor) and (isinstance(module, QuantAct) or is_quantized(inputs[0])):
            quantized[output.untyped_storage().data_ptr()] = (output, output._version)

    unquantized: list[str] = []

    def check_for(name: str):
        def check(module, inputs):
            if not is_quantized(inputs[0]) and name not in unquantized:
                unquantized.append(name)

        return check

    handles = []
    try:
        for name, module in student.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_pre_hook(check_for(name)))
            if isinstance(module, (QuantAct,) + _GRID_KEEPING):
                handles.append(module.register_forward_hook(mark))
        with _inspected(student):
            student(example)
    finally:
        for handle in handles:
            handle.remove()
    return unquantized


def shared_act_quantizers(student: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """The QuantActs that one forward of ``example`` calls more than once: name -> number of calls.

    A model that reuses one activation module at several places (torchvision's ResNet blocks call one ReLU
    twice) gets one QuantAct there. That changes nothing for a quantizer without state (``granq``), but a
    tracked one (``layerwise``, ``channel``) keeps a single range for all those places. The student is left
    as it was (see :func:`_inspected`).
    """
    calls: dict[str, int] = {}
    handles = []

    def count_for(name: str):
        def count(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1

        return count

    try:
        for name, module in student.named_modules():
            if isinstance(module, QuantAct):
                handles.append(module.register_forward_hook(count_for(name)))
        with _inspected(student):
            student(example)
    finally:
        for handle in handles:
            handle.remove()
    return {name: n for name, n in calls.items() if n > 1}
