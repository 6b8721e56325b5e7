import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization_utils import (
    ActQuant,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    StudentSpec,
    WeightQuant,
    count_modules,
    granq_fake_quant,
    layerwise_fake_quant,
    quantize_model,
    set_act_tracking,
    weight_fake_quant,
)
from utils.models import get_model_spec


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_quant_conv_from_float(granularity):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    qconv = QuantConv2d.from_float(conv, WeightQuant(3, granularity))
    assert isinstance(qconv, nn.Conv2d)
    assert qconv.state_dict().keys() == conv.state_dict().keys()
    assert torch.equal(qconv.weight, conv.weight) and qconv.weight is not conv.weight
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(x, weight_fake_quant(conv.weight, 3, granularity), conv.bias, 2, 1)
    assert torch.equal(qconv(x), expected)
    assert "weight_bits=3" in repr(qconv) and granularity in repr(qconv)


def test_quant_linear_from_float_and_gradient():
    linear = nn.Linear(5, 3)
    qlinear = QuantLinear.from_float(linear, WeightQuant(4))
    x = torch.randn(2, 5)
    assert torch.equal(qlinear(x), F.linear(x, weight_fake_quant(linear.weight, 4), linear.bias))
    qlinear(x).sum().backward()
    # straight-through: the float weight gets the gradient of the quantized one
    assert torch.allclose(qlinear.weight.grad, torch.ones(3, 1) * x.sum(0))


def test_quant_act_granq():
    act = QuantAct(ActQuant(3))
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(act(x), granq_fake_quant(x, 3))
    assert not list(act.buffers())  # GranQ keeps no state


def test_quant_act_layerwise_moving_average():
    act = QuantAct(ActQuant(4, "layerwise", momentum=0.9))
    first = torch.tensor([[-1.0, 3.0]])
    act(first)
    assert act.x_min.item() == pytest.approx(-1.0) and act.x_max.item() == pytest.approx(3.0)
    act(torch.tensor([[0.0, 5.0]]))
    # bias-corrected average: (0.9*0.1*m1 + 0.1*m2) / (1 - 0.81)
    assert act.x_min.item() == pytest.approx((0.09 * -1.0 + 0.1 * 0.0) / 0.19)
    assert act.x_max.item() == pytest.approx((0.09 * 3.0 + 0.1 * 5.0) / 0.19)
    act.fix()
    frozen = act.x_max.clone()
    x = torch.tensor([[-10.0, 10.0]])
    assert torch.equal(act(x), layerwise_fake_quant(x, 4, act.x_min, act.x_max))
    assert torch.equal(act.x_max, frozen)
    act.unfix()
    act(x)
    assert act.x_max > frozen


def test_quant_act_rejects_unknown_mode():
    with pytest.raises(ValueError, match="no activation quantizer is registered as 'percentile'"):
        ActQuant(4, "percentile")


@pytest.mark.parametrize("network", ["resnet20_cifar10", "resnet20a_cifar10"])
def test_quantize_model_resnet20(network):
    teacher = get_model_spec(network).build().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = quantize_model(teacher, StudentSpec.of(4, 4))
    # the teacher is untouched
    assert count_modules(teacher, (QuantAct, QuantConv2d, QuantLinear)) == 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # a QuantAct right after each of the 19 ReLUs
    assert count_modules(teacher, nn.ReLU) == 19
    pairs = [m for m in student.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and isinstance(m[0], nn.ReLU) and isinstance(m[1], QuantAct)]
    assert len(pairs) == 19 == count_modules(student, QuantAct)
    # every conv and linear quantized, BatchNorm left in float
    assert count_modules(student, QuantConv2d) == count_modules(teacher, nn.Conv2d)
    assert count_modules(student, QuantLinear) == count_modules(teacher, nn.Linear) == 1
    assert count_modules(student, nn.BatchNorm2d) == count_modules(teacher, nn.BatchNorm2d)
    assert not any(type(m) is nn.Conv2d for m in student.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape == (2, 10)


def test_quantize_model_does_not_quantize_the_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU())
    student = quantize_model(model, StudentSpec.of(8, 2))
    with torch.no_grad():
        student[0].weight.copy_(torch.eye(3, 3).repeat(2, 1)[:4, :, None, None])
    x = torch.rand(1, 3, 2, 2) * 0.3 + 0.35
    # the image enters the first conv unquantized: its first channel passes through exactly
    assert torch.equal(student[0](x)[:, 0], x[:, 0])


def test_set_act_tracking():
    student = quantize_model(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU6()),
                             StudentSpec.of(4, 4, mode="layerwise"))
    acts = [m for m in student.modules() if isinstance(m, QuantAct)]
    assert len(acts) == 2
    set_act_tracking(student, False)
    assert not any(a.tracking for a in acts)
    set_act_tracking(student, True)
    assert all(a.tracking for a in acts)


def test_quantize_model_rejects_bad_bits():
    with pytest.raises(ValueError, match="got 9"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), StudentSpec.of(9, 4))
