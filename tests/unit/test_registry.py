"""One registry class serves the activation quantizers, the student-loss terms, the input filters and the models:
the same checks when registering, the same error for an unknown name."""

import functools

import pytest

from quantization_utils import ACT_QUANTIZERS, ActQuantizer, Registry, UnknownNameError, register_act_quantizer
from utils.models.registry import MODELS, register_model
from utils.training.losses import (
    INPUT_FILTERS,
    STUDENT_LOSSES,
    StudentLoss,
    register_input_filter,
    register_student_loss,
)

# registry, its decorator (a function of the name), the base a registered class must subclass (None: functions only)
REGISTRIES = {
    "act_quantizers": (ACT_QUANTIZERS, register_act_quantizer, ActQuantizer),
    "student_losses": (STUDENT_LOSSES, register_student_loss, StudentLoss),
    "input_filters": (INPUT_FILTERS, register_input_filter, None),
    "models": (MODELS, functools.partial(register_model, dataset="cifar10", num_classes=10, image_size=32,
                                         fetch_published=None), None),
}


@pytest.fixture(params=REGISTRIES)
def kind(request):
    registry, register, base = REGISTRIES[request.param]
    before = set(registry)
    yield registry, register, base
    for name in set(registry) - before:
        del registry[name]


def test_every_registry_is_the_one_class(kind):
    registry, _, _ = kind
    assert isinstance(registry, Registry) and len(registry) > 0 and registry.names() == tuple(registry)


def test_an_unknown_name_lists_the_registered_ones(kind):
    registry, _, _ = kind
    with pytest.raises(UnknownNameError, match=f"is registered as 'no_such_entry'; the registered ones: "
                                               f"{', '.join(registry.names())}$"):
        registry["no_such_entry"]


def test_registration_needs_a_docstring_a_new_name_and_the_base_class(kind):
    registry, register, base = kind

    def documented():
        """y = x."""

    def undocumented():
        pass

    with pytest.raises(TypeError, match="'test_undocumented' needs a docstring that states"):
        register("test_undocumented")(undocumented)
    with pytest.raises(ValueError, match=f"'{registry.names()[0]}' is already registered"):
        register(registry.names()[0])(documented)
    plain = type("Plain", (), {"__doc__": "y = x"})
    with pytest.raises(TypeError, match="must subclass" if base else "expected a function"):
        register("test_plain")(plain)
    assert "test_undocumented" not in registry and "test_plain" not in registry
    assert register("test_documented")(documented) is documented and "test_documented" in registry
