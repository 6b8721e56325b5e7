"""Student loss terms and input filters as plug-ins: ``student_losses`` and ``student_input_filter`` name entries here.

A student loss term is one decorated function or class whose docstring states its formula and its paper:

- a function ``f(batch, options) -> loss`` for a term that reads only the logits and labels of a
  :class:`StudentBatch`;
- a subclass of :class:`StudentLoss` for one that reads intermediate activations. Its ``layers(model, image)``
  names the modules whose outputs it reads; the names are resolved once on the teacher and hooked on the teacher
  and the student alike (the student is a copy of the teacher with the same module names), and ``__call__(batch)``
  finds the outputs in ``batch.teacher_features`` and ``batch.student_features``.

A term returns what it adds to the student's loss, its weight included: the trainer sums the terms of
``student_losses`` into ``loss_S`` and records each one under its name.

    >>> @register_student_loss("logit_mse_example")
    ... def logit_mse_example(batch, options):
    ...     '''mean_n ||t_n - s_n||^2 over the logits (an example, no paper).'''
    ...     return (batch.teacher_logits.detach() - batch.student_logits).square().sum(1).mean()
    >>> "logit_mse_example" in student_loss_names()
    True
    >>> del STUDENT_LOSSES["logit_mse_example"]

An input filter ``f(images, options) -> images``, registered with :func:`register_input_filter`, changes the
generated images that the teacher's targets and the student's distillation come from; the generator's own losses
keep the unfiltered images. ``none`` returns its input itself.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from quantization_utils.registry import Registry

from ...models import example_image
from ...system.errors import UserError

__all__ = ["INPUT_FILTERS", "STUDENT_LOSSES", "FeatureCapture", "MissingLayersError", "StudentBatch", "StudentLoss",
           "build_student_losses", "input_filter_names", "make_input_filter", "register_input_filter",
           "register_student_loss", "student_loss", "student_loss_names"]

@dataclass
class StudentBatch:
    """What a student loss term reads in one iteration.

    ``teacher_logits`` carry the graph of the teacher's forward pass (a term that needs the teacher's gradients,
    such as Grad-CAM, uses it); targets are to be detached. ``progress`` is the share of the student's training
    done: 0 at its first iteration, rising linearly to (n - 1) / n at its last of n.
    """

    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    labels: torch.Tensor  # the classes the generator was asked for
    teacher_features: dict[str, torch.Tensor]  # module name -> output, for the layers the terms asked for
    student_features: dict[str, torch.Tensor]
    progress: float = 0.0


class MissingLayersError(ValueError):
    """A term's ``layers`` found nothing it can read in the model; the message says what it looks for."""


class StudentLoss:
    """Base of the registered term classes: ``options`` holds the term's settings, ``layer_names`` the modules
    whose outputs it reads (set from :meth:`layers` before the first call)."""

    def __init__(self, options):
        self.options = options
        self.layer_names: tuple[str, ...] = ()

    def layers(self, model: nn.Module, image: torch.Tensor) -> list[str]:
        """Names of the modules of ``model`` whose outputs the term reads; ``image`` is an example input (one
        image) for a rule that needs a forward pass. Raise :class:`MissingLayersError` if the model has none."""
        return []

    def __call__(self, batch: StudentBatch) -> torch.Tensor:
        raise NotImplementedError


# name -> the registered function or StudentLoss subclass, in order of registration
STUDENT_LOSSES = Registry("student loss term", StudentLoss, "its formula and its source")
# name -> the registered filter function, in order of registration
INPUT_FILTERS = Registry("input filter", docstring="its formula and its source")


class _FunctionLoss(StudentLoss):
    """A registered function ``f(batch, options)``: no layers."""

    def __init__(self, fn, options):
        super().__init__(options)
        self.fn = fn

    def __call__(self, batch: StudentBatch) -> torch.Tensor:
        return self.fn(batch, self.options)


def register_student_loss(name: str):
    """Decorator registering a student loss term (a function ``f(batch, options)`` or a :class:`StudentLoss`
    subclass) under ``name``; its docstring must state the formula and the paper."""
    return STUDENT_LOSSES.register(name)


def register_input_filter(name: str):
    """Decorator registering an input filter ``f(images, options) -> images`` under ``name``; its docstring
    must state the formula and the paper."""
    return INPUT_FILTERS.register(name)


def student_loss_names() -> tuple[str, ...]:
    """The registered ``student_losses`` entries, in order of registration."""
    return STUDENT_LOSSES.names()


def input_filter_names() -> tuple[str, ...]:
    """The registered ``student_input_filter`` values, in order of registration."""
    return INPUT_FILTERS.names()


def make_input_filter(name: str) -> Callable:
    """The filter registered as ``name``; :class:`~quantization_utils.registry.UnknownNameError` listing the
    names if there is none."""
    return INPUT_FILTERS[name]


def _make_student_loss(name: str, options) -> StudentLoss:
    entry = STUDENT_LOSSES[name]
    return entry(options) if inspect.isclass(entry) else _FunctionLoss(entry, options)


def build_student_losses(options, teacher: nn.Module) -> list[tuple[str, StudentLoss]]:
    """(name, term) for each entry of ``options.student_losses``, with the layers each reads resolved on
    ``teacher``. Raises UserError naming the term and the network when the teacher lacks what a term reads."""
    terms = []
    image = None
    for name in options.student_losses:
        term = _make_student_loss(name, options)
        if type(term).layers is not StudentLoss.layers:
            if image is None:
                device = next(teacher.parameters(), torch.empty(0)).device
                image = example_image(options.channels, options.img_size, device)
            try:
                with torch.no_grad():
                    term.layer_names = tuple(term.layers(teacher.eval(), image))
            except MissingLayersError as error:
                raise UserError(f"student_losses: the {name!r} term cannot run on network {options.network!r}: "
                                f"{error}; drop {name!r} from student_losses for this network") from None
        terms.append((name, term))
    return terms


def student_loss(terms, features: dict, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                 labels: torch.Tensor, progress=0.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each of ``terms`` ((name, term) pairs of :func:`build_student_losses`) on one :class:`StudentBatch` of the
    logits, the labels, the layer outputs ``features`` (by role, :meth:`FeatureCapture.take`) and the ``progress``;
    returns the values and their sum, ``loss_S``."""
    batch = StudentBatch(teacher_logits, student_logits, labels, features["teacher"], features["student"], progress)
    values = [term(batch) for _, term in terms]
    return values, torch.stack(values).sum()


class FeatureCapture:
    """Outputs of the modules named ``layers`` in each of ``models`` (role -> model, e.g. teacher and student).

    One forward hook per model and layer, registered by module name, collecting only inside :meth:`capture`
    (evaluation passes cost nothing); :meth:`remove` detaches them. No layer: no hook. The outputs are kept as
    they are, not copied, so that a term can take gradients with respect to them; a module whose output a later
    in-place operation changes (a convolution followed by an in-place activation) is seen after that change.
    """

    def __init__(self, models: dict[str, nn.Module], layers):
        self.layers = tuple(dict.fromkeys(layers))
        self.outputs: dict[str, dict[str, torch.Tensor]] = {role: {} for role in models}
        self._collecting = False
        self._handles = []
        for role, model in models.items():
            modules = dict(model.named_modules())
            missing = [name for name in self.layers if name not in modules]
            if missing:
                raise ValueError(f"the {role} has no module named {', '.join(missing)}")
            self._handles += [modules[name].register_forward_hook(functools.partial(self._hook, role, name))
                              for name in self.layers]

    def _hook(self, role, name, module, inputs, output):
        if self._collecting:
            self.outputs[role][name] = output

    @contextmanager
    def capture(self, enabled: bool = True):
        """Collect the outputs of the forward passes run inside; ``enabled=False`` collects nothing (and keeps
        what an earlier capture collected)."""
        if not enabled or not self.layers:
            yield self
            return
        self.take()
        self._collecting = True
        try:
            yield self
        finally:
            self._collecting = False

    def take(self) -> dict[str, dict[str, torch.Tensor]]:
        """The outputs collected so far, by role, handed over: the capture keeps no reference to them (nor to the
        graphs they carry) once the caller is done."""
        outputs, self.outputs = self.outputs, {role: {} for role in self.outputs}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@register_input_filter("none")
def no_filter(images: torch.Tensor, options) -> torch.Tensor:
    """x -> x: the student distils on the generated images themselves (GranQ)."""
    return images
