"""Model surgery beyond ReLU networks: act_types, rebuilding with them, and the float-input report."""

import pytest
import torch
import torch.nn as nn

from quantization_utils import (
    ACT_TYPES,
    ActQuant,
    QuantAct,
    QuantConv2d,
    StudentSpec,
    WeightQuant,
    activation_classes,
    count_modules,
    quantize_model,
    rebuild_student,
    set_act_tracking,
    shared_act_quantizers,
    unquantized_inputs,
)
from tests.e2e.user_models import MaskedConv, reused_relu_net, tiny_hardswish_net, tiny_net

SPEC = StudentSpec.of(4, 4, impl="eager")


def test_act_types_by_name_and_class():
    assert activation_classes(["relu", "relu6"]) == (nn.ReLU, nn.ReLU6)
    assert activation_classes(["gelu", nn.SiLU]) == (nn.GELU, nn.SiLU)
    # pytorchcv's MobileNetV3 and EfficientNet use their own modules for the same functions.
    from pytorchcv.models.common.activ import HSwish, Swish

    assert activation_classes(["hardswish", "silu"]) == (nn.Hardswish, HSwish, nn.SiLU, Swish)
    assert set(ACT_TYPES) == {"relu", "relu6", "hardswish", "silu", "gelu", "leaky_relu"}
    with pytest.raises(ValueError, match="unknown activation type 'swish'; choose from relu, relu6"):
        activation_classes(["swish"])


def test_default_act_types_leave_hardswish_in_float():
    student = quantize_model(tiny_hardswish_net(), StudentSpec.of(4, 4, impl="eager"))
    assert count_modules(student, QuantAct) == 0
    assert count_modules(student, QuantConv2d) == 2


@pytest.mark.parametrize("act_types", [["hardswish"], [nn.Hardswish], ["relu", "hardswish"]])
def test_hardswish_gets_a_quant_act(act_types):
    teacher = tiny_hardswish_net().eval()
    student = quantize_model(teacher, StudentSpec.of(4, 3, impl="eager", act_types=act_types))
    wrapped = [m for m in student.modules() if isinstance(m, nn.Sequential) and len(m) == 2
               and isinstance(m[0], nn.Hardswish) and isinstance(m[1], QuantAct)]
    assert len(wrapped) == 2 == count_modules(student, QuantAct)
    assert all(m[1].quant.bits == 3 for m in wrapped)
    # Hardswish goes below zero: the asymmetric grid covers it, at most 2**3 levels per (sample, channel).
    captured = []
    wrapped[0].register_forward_hook(lambda module, inputs, output: captured.append((inputs[0], output)))
    with torch.no_grad():
        student(torch.randn(2, 3, 16, 16))
    before, after = captured[0]
    assert before.min() < 0 and after.min() < 0
    assert max(len(torch.unique(row)) for row in after.flatten(2).flatten(0, 1)) <= 8


@pytest.mark.parametrize("name, cls", [("silu", nn.SiLU), ("gelu", nn.GELU), ("leaky_relu", nn.LeakyReLU)])
def test_other_activation_types(name, cls):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), cls(), nn.Conv2d(4, 2, 1))
    student = quantize_model(model, StudentSpec.of(4, 4, impl="eager", act_types=[name]))
    assert isinstance(student[2], nn.Sequential) and isinstance(student[2][0], cls)
    assert isinstance(student[2][1], QuantAct)


def test_rebuild_student_honours_the_spec_act_types():
    teacher = tiny_hardswish_net().eval()
    spec = StudentSpec.of(4, 4, impl="eager", act_types=["hardswish"])
    student = quantize_model(teacher, spec)
    rebuilt = rebuild_student(tiny_hardswish_net(), spec, student.state_dict())
    assert count_modules(rebuilt, QuantAct) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), student.eval()(x))


def test_options_without_act_types_give_relu_and_relu6():
    # Checkpoints whose options have no act_types quantized after ReLU and ReLU6.
    spec = StudentSpec.from_dict({"qw": 4, "qa": 4, "act_mode": "granq", "weight_granularity": "kernel",
                                  "granq_impl": "eager"})
    assert spec == SPEC and spec.act_types == ("relu", "relu6")
    student = quantize_model(tiny_net(), SPEC)
    rebuilt = rebuild_student(tiny_net(), spec, student.state_dict())
    assert count_modules(rebuilt, QuantAct) == 2
    relu6_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    assert count_modules(rebuild_student(relu6_model, spec, quantize_model(relu6_model, SPEC).state_dict()),
                         QuantAct) == 1


def test_the_spec_is_checked_when_built_and_round_trips_its_dict():
    spec = StudentSpec.of(5, 3, mode="channel", granularity="channel", momentum=0.8, impl="eager",
                          act_types=["relu", nn.GELU])
    assert spec.to_dict() == {"qw": 5, "qa": 3, "act_mode": "channel", "weight_granularity": "channel",
                              "act_momentum": 0.8, "quant_impl": "eager",
                              "act_types": ["relu", "torch.nn.modules.activation:GELU"]}
    again = StudentSpec.from_dict(spec.to_dict())
    assert again.to_dict() == spec.to_dict() and activation_classes(again.act_types) == (nn.ReLU, nn.GELU)
    with pytest.raises(ValueError, match="bits"):
        StudentSpec.of(9, 4)
    with pytest.raises(ValueError, match="no activation quantizer is registered as 'percentile'"):
        StudentSpec.of(4, 4, mode="percentile")
    with pytest.raises(ValueError, match="quant_impl must be one of"):
        StudentSpec.of(4, 4, impl="fast")
    with pytest.raises(ValueError, match="momentum must be in"):
        StudentSpec.of(4, 4, momentum=1.0)
    with pytest.raises(ValueError, match="unknown activation type 'swish'"):
        StudentSpec.of(4, 4, act_types=["swish"])
    with pytest.raises(ValueError, match="one implementation serves weights and activations"):
        StudentSpec(WeightQuant(4, impl="eager"), ActQuant(4), ("relu",))
    with pytest.raises(ValueError, match="the settings lack qa, weight_granularity"):
        StudentSpec.from_dict({"qw": 4, "act_mode": "granq"})


def test_unquantized_inputs_names_the_float_readers():
    student = quantize_model(tiny_net(), StudentSpec.of(4, 4, impl="eager"))
    # 0: the image; 3: after ReLU + QuantAct; 8: after average pooling.
    assert unquantized_inputs(student, torch.randn(1, 3, 16, 16)) == ["0", "8"]
    float_acts = quantize_model(tiny_hardswish_net(), StudentSpec.of(4, 4, impl="eager"))
    assert unquantized_inputs(float_acts, torch.randn(1, 3, 16, 16)) == ["0", "3", "8"]


class _Branches(nn.Module):
    """Inputs through a max pool and a flatten (still quantized), an in-place add and a sum (not)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.after_pool = nn.Conv2d(4, 4, 1)
        self.after_sum = nn.Conv2d(4, 4, 1)
        self.after_inplace = nn.Conv2d(4, 4, 1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        x = self.relu(self.conv(x))
        pooled = self.pool(x)
        a = self.after_pool(pooled)
        b = self.after_sum(pooled + a)
        changed = self.relu(a)
        changed += 1  # in place, after the quantizer
        c = self.after_inplace(changed)
        return self.fc(self.flatten(self.pool(self.relu(b + c))))


def test_unquantized_inputs_follow_grid_keeping_modules_and_views():
    student = quantize_model(_Branches(), StudentSpec.of(4, 4, impl="eager"))
    assert unquantized_inputs(student, torch.randn(1, 3, 16, 16)) == ["conv", "after_sum", "after_inplace"]


def test_unquantized_inputs_leave_the_student_unchanged():
    student = quantize_model(tiny_net(), StudentSpec.of(4, 4, mode="layerwise", impl="auto"))
    set_act_tracking(student, True)
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    quantizers = [m.quantizer for m in student.modules() if isinstance(m, QuantAct)]
    unquantized_inputs(student, torch.randn(1, 3, 16, 16))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # no range was tracked
    assert student.training and all(m.tracking for m in student.modules() if isinstance(m, QuantAct))
    assert [m.quantizer for m in student.modules() if isinstance(m, QuantAct)] == quantizers


@pytest.mark.parametrize("act_mode", ["channel", "layerwise", "granq"])
def test_unquantized_inputs_need_no_tracked_ranges(act_mode):
    # At start-up the ranges of a tracked mode are still empty; the check must not read them.
    student = quantize_model(tiny_net(), StudentSpec.of(4, 4, mode=act_mode, impl="eager")).eval()
    set_act_tracking(student, False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    first_conv = next(name for name, m in student.named_modules() if isinstance(m, nn.Conv2d))
    assert unquantized_inputs(student, torch.randn(1, 3, 16, 16))[0] == first_conv
    assert student.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert all(type(m).forward is QuantAct.forward and "forward" not in vars(m)
               for m in student.modules() if isinstance(m, QuantAct))


def test_conv_subclasses_keep_their_forward():
    model = nn.Sequential(MaskedConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    student = quantize_model(model, StudentSpec.of(4, 4, impl="eager"))
    assert type(student[0]) is MaskedConv and isinstance(student[3], QuantConv2d)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(student[0](x), model[0](x))


@pytest.mark.parametrize("act_mode", ["layerwise", "granq"])
def test_shared_act_quantizers_counts_calls_and_leaves_the_student_unchanged(act_mode):
    student = quantize_model(reused_relu_net(), StudentSpec.of(4, 4, mode=act_mode, impl="eager"))
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert shared_act_quantizers(student, torch.randn(1, 3, 8, 8)) == {"relu.1": 2}
    assert student.training and all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert all("forward" not in vars(m) for m in student.modules() if isinstance(m, QuantAct))


def test_torchvision_resnet_blocks_share_one_relu_quantizer():
    import torchvision

    student = quantize_model(torchvision.models.resnet18(weights=None), StudentSpec.of(4, 4, mode="layerwise",
                                                                                        impl="eager"))
    shared = shared_act_quantizers(student, torch.randn(1, 3, 64, 64))
    assert shared == {f"layer{i}.{j}.relu.1": 2 for i in range(1, 5) for j in range(2)}

