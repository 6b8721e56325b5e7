"""Model surgery: turn a float model into a fake-quantized student."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn

from .fused import weight_function
from .modules import ActQuant, QuantAct, QuantConv2d, QuantLinear, WeightQuant

__all__ = ["ACTIVATIONS", "ACT_TYPES", "DEFAULT_ACT_TYPES", "StudentSpec", "activation_classes", "count_modules",
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
    take pytorchcv's HSwish and Swish), ``nn.Module`` subclasses or their ``"MODULE:CLASS"`` names.

    >>> [kind.__name__ for kind in activation_classes(["relu6", nn.GELU, "torch.nn:SiLU"])]
    ['ReLU6', 'GELU', 'SiLU']
    """
    classes = []
    for kind in act_types:
        if isinstance(kind, str) and ":" in kind:
            kind = _import_class(kind)
        if isinstance(kind, type) and issubclass(kind, nn.Module):
            classes.append(kind)
        elif kind in ACT_TYPES:
            classes += [ACT_TYPES[kind]] + _pytorchcv_equivalent(kind)
        else:
            raise ValueError(f"unknown activation type {kind!r}; choose from {', '.join(ACT_TYPES)} "
                             f"or give an nn.Module class")
    return tuple(classes)


def _import_class(name: str) -> type | str:
    """The class named ``"MODULE:CLASS"`` (a dotted path within the module); the name itself if there is none."""
    module_name, _, path = name.partition(":")
    try:
        found = importlib.import_module(module_name)
        for part in path.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return name
    return found


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


@dataclass(frozen=True)
class StudentSpec:
    """What makes a student of a float model: how its weights (``weight``) and its activations (``act``) are
    fake-quantized, and the activation modules that a QuantAct follows (``act_types``: names of
    :data:`ACT_TYPES`, ``nn.Module`` classes or ``"MODULE:CLASS"``). One implementation serves the weights and
    the activations (:attr:`impl`). Checked when built.

    Its dict (:meth:`to_dict`, read back by :meth:`from_dict`) is what records a student: the run's summary,
    the metadata of an exported file.

    >>> spec = StudentSpec.of(4, 3, mode="layerwise", impl="eager")
    >>> spec.to_dict()["qa"], spec.to_dict()["act_mode"], spec.to_dict()["quant_impl"]
    (3, 'layerwise', 'eager')
    >>> StudentSpec.from_dict(spec.to_dict()) == spec
    True
    """

    weight: WeightQuant
    act: ActQuant
    act_types: tuple = DEFAULT_ACT_TYPES

    def __post_init__(self):
        object.__setattr__(self, "act_types", tuple(self.act_types))
        if not self.act_types:
            raise ValueError(f"act_types names no activation; choose from {', '.join(ACT_TYPES)}")
        activation_classes(self.act_types)  # an unknown name raises here
        if self.weight.impl != self.act.impl:
            raise ValueError(f"one implementation serves weights and activations; got {self.weight.impl!r} for the "
                             f"weights and {self.act.impl!r} for the activations")

    @property
    def impl(self) -> str:
        """The implementation of the quantizers: ``auto``, ``compiled`` or ``eager`` (:mod:`.fused`)."""
        return self.act.impl

    @classmethod
    def of(cls, weight_bits: int, act_bits: int, *, mode: str = "granq", granularity: str = "kernel",
           momentum: float = 0.9, impl: str = "auto",
           act_types: typing.Iterable[str | type] = DEFAULT_ACT_TYPES) -> "StudentSpec":
        """The spec of one implementation ``impl`` for ``WeightQuant(weight_bits, granularity)`` and
        ``ActQuant(act_bits, mode, momentum)``."""
        return cls(WeightQuant(weight_bits, granularity, impl), ActQuant(act_bits, mode, momentum, impl),
                   tuple(act_types))

    def to_dict(self) -> dict:
        """The spec as a plain dict, under the keys of the run options that set it; classes of ``act_types``
        become ``"MODULE:CLASS"``."""
        return {"qw": self.weight.bits, "qa": self.act.bits, "act_mode": self.act.mode,
                "weight_granularity": self.weight.granularity, "act_momentum": self.act.momentum,
                "quant_impl": self.impl, "act_types": [_type_name(kind) for kind in self.act_types]}

    @classmethod
    def from_dict(cls, values: typing.Mapping) -> "StudentSpec":
        """The spec of ``values``: the output of :meth:`to_dict` or a run's options, whose other keys are left
        alone. ``qw``, ``qa``, ``act_mode`` and ``weight_granularity`` are needed; the others have defaults
        (``act_types``: ReLU and ReLU6, as the official code). ValueError for what is missing or wrong."""
        missing = [key for key in ("qw", "qa", "act_mode", "weight_granularity") if key not in values]
        if missing:
            raise ValueError(f"the settings lack {', '.join(missing)}: a student needs qw, qa, act_mode and "
                             f"weight_granularity")
        # granq_impl: the former name of quant_impl, which runs and exported files saved under it still hold
        impl = values.get("quant_impl", values.get("granq_impl", "auto"))
        return cls.of(values["qw"], values["qa"], mode=values["act_mode"], granularity=values["weight_granularity"],
                      momentum=values.get("act_momentum", 0.9), impl=impl,
                      act_types=values.get("act_types", DEFAULT_ACT_TYPES))


def _type_name(kind: str | type) -> str:
    return kind if isinstance(kind, str) else f"{kind.__module__}:{kind.__qualname__}"


def quantize_model(model: nn.Module, spec: StudentSpec) -> nn.Module:
    """Return the fake-quantized copy of ``model`` that ``spec`` describes; ``model`` itself is not modified.

    Every Conv2d and Linear (not their subclasses, which keep their own forward and float weights) becomes a
    QuantConv2d / QuantLinear of ``spec.weight``; every activation module of ``spec.act_types`` is followed by a
    QuantAct of ``spec.act``. BatchNorm stays in float and the input image is not quantized.
    """
    activations = activation_classes(spec.act_types)
    if isinstance(model, (nn.Conv2d, nn.Linear) + activations):
        raise TypeError("quantize_model expects a network that contains layers, not a single layer")
    quantized = copy.deepcopy(model)
    _quantize_children(quantized, spec.weight, functools.partial(QuantAct, spec.act), activations)
    return quantized


def rebuild_student(float_model: nn.Module, spec: StudentSpec, state_dict: dict) -> nn.Module:
    """The quantized student of ``spec`` that ``state_dict`` was saved from, in eval mode, on the device of its
    tensors.

    ``float_model`` has the student's float architecture (its weights are replaced). Tracked activation ranges
    (layer-wise, channel-wise) come from ``state_dict`` and are frozen, as the trainer freezes them for
    evaluation. Raises ValueError when the state dict does not fit.
    """
    student = quantize_model(float_model, spec)
    try:
        student.load_state_dict(state_dict)
    except RuntimeError as error:
        settings = ", ".join(f"{key}={value}" for key, value in spec.to_dict().items())
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
