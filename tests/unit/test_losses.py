import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.models import get_model_spec
from utils.training.losses import (
    STUDENT_LOSSES,
    BNStatistics,
    FeatureCapture,
    MissingLayersError,
    NonFiniteLossError,
    StudentBatch,
    StudentLoss,
    check_finite,
    entropy,
    kd_loss,
    marginal_loss,
    onehot_loss,
    register_input_filter,
    register_student_loss,
)
from utils.training.losses.akt import AttentionDistillation
from utils.training.losses.layers import last_spatial_conv, stage_blocks
from utils.training.losses.plf import pseudo_label
from utils.training.losses.synq import GradCamAlignment, lowpass, reliable_ce


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.zeros(2, 10)).tolist() == pytest.approx([math.log(10)] * 2)
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_onehot_loss():
    t, s, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    expected = 0.2 * F.cross_entropy(t - s, y) + 0.1 * F.cross_entropy(t + s, y)
    assert torch.allclose(onehot_loss(t, s, y, 0.2, 0.1), expected)


@pytest.mark.parametrize("batch", [1, 2, 16, 200])
def test_marginal_loss_any_batch_size(batch):
    t, s = torch.randn(batch, 10) * 3, torch.randn(batch, 10)
    h = entropy(t - s)
    h_norm = (h - h.min()) / (math.log(10) - h.min())
    expected = torch.clamp(0.1 - h_norm, min=0).mean() + torch.clamp(h_norm - 0.8, min=0).mean()
    assert torch.allclose(marginal_loss(t, s, 10, 0.1, 0.8), expected)


def test_marginal_loss_hand_case():
    # sample 0 uniform (h' = 1), sample 1 confident (h' = 0): relu(0.1 - 0)/2 + relu(1 - 0.8)/2
    t = torch.tensor([[0.0, 0.0], [50.0, 0.0]])
    assert marginal_loss(t, torch.zeros(2, 2), 2, 0.1, 0.8).item() == pytest.approx(0.05 + 0.1, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 5.0, 20.0])
def test_kd_loss_uses_its_temperature(temperature):
    t, s = torch.randn(3, 10), torch.randn(3, 10)
    p = F.softmax((t - s) / temperature, dim=1)
    expected = -temperature**2 * (-(p * p.log()).sum(1)).mean()
    assert torch.allclose(kd_loss(t, s, temperature), expected)


def test_bn_statistics_loss_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    model[1].running_mean.fill_(0.5)
    model[4].running_var.fill_(2.0)
    stats = BNStatistics(model)
    x = torch.randn(4, 3, 5, 5)
    with stats.capture():
        model(x)
    inputs = [model[0](x), model[3](model[2](model[1](model[0](x))))]
    expected = sum(F.mse_loss(a.mean((0, 2, 3)), bn.running_mean) + F.mse_loss(a.var((0, 2, 3), unbiased=False),
                                                                                 bn.running_var)
                   for a, bn in zip(inputs, [model[1], model[4]])) / 2
    assert torch.allclose(stats.loss(), expected, atol=1e-6)
    # the statistics went to the loss (nothing here keeps their graph), and outside capture() nothing is collected
    model(x)
    with pytest.raises(RuntimeError, match="captured 0 BatchNorm inputs, expected 2"):
        stats.loss()
    stats.remove()
    assert not model[1]._forward_hooks


def test_bn_statistics_gradient_reaches_the_input():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()
    stats = BNStatistics(model)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with stats.capture():
        model(x)
    stats.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bn, shape", [(nn.BatchNorm1d, (8, 3)), (nn.BatchNorm1d, (8, 3, 5)),
                                       (nn.BatchNorm3d, (4, 3, 2, 3, 3))])
def test_bn_statistics_of_1d_and_3d_batchnorm(bn, shape):
    layer = bn(3).eval()
    layer.running_mean.fill_(0.25)
    layer.running_var.fill_(1.5)
    stats = BNStatistics(layer)
    x = torch.randn(shape)
    with stats.capture():
        layer(x)
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    expected = F.mse_loss(mean, layer.running_mean) + F.mse_loss(var, layer.running_var)
    assert torch.allclose(stats.loss(), expected, atol=1e-6)


# ------------------------------------------------------------------------------------- student loss terms

def batch_of(teacher, student, labels=None, teacher_features=None, student_features=None, progress=0.0):
    labels = torch.zeros(len(teacher), dtype=torch.long) if labels is None else labels
    return StudentBatch(teacher, student, labels, teacher_features or {}, student_features or {}, progress)


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kd_term_is_the_official_distillation():
    t, s = torch.randn(3, 10), torch.randn(3, 10)
    value = STUDENT_LOSSES["kd"](batch_of(t, s), SimpleNamespace(temperature=4.0))
    p = F.softmax((t - s) / 4, dim=1)
    assert value.item() == pytest.approx((-16 * (-(p * p.log()).sum(1)).mean()).item(), rel=1e-6)


def test_attention_term_by_hand():
    # one sample, two channels, 1 x 2 positions
    a = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]], dtype=torch.float64)
    b = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]], dtype=torch.float64, requires_grad=True)
    term = AttentionDistillation(SimpleNamespace(attention_weight=10.0, attention_temperature=2.0))
    term.layer_names = ("block",)
    value = term(batch_of(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64),
                          teacher_features={"block": a}, student_features={"block": b}))
    # channel attention: softmax of the per-channel mean of a^2; spatial: the L2-normalised channel mean of a^2
    channel_t, channel_s = softmax([1.0, 2.0]), softmax([0.5, 1.0])
    spatial_t = [2.5 / math.hypot(2.5, 0.5), 0.5 / math.hypot(2.5, 0.5)]
    spatial_s = [1.0 / math.hypot(1.0, 0.5), 0.5 / math.hypot(1.0, 0.5)]
    expected = 10 * sum(kl(softmax([x / 2 for x in t]), softmax([x / 2 for x in s]))
                        for t, s in ((channel_t, channel_s), (spatial_t, spatial_s)))
    assert value.item() == pytest.approx(expected, rel=1e-9)
    value.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_attention_sums_over_the_batch_and_the_blocks():
    a = torch.randn(2, 3, 4, 4)
    b = torch.randn(2, 3, 4, 4)
    term = AttentionDistillation(SimpleNamespace(attention_weight=1.0, attention_temperature=8.0))
    term.layer_names = ("x",)

    def value(t, s, names=("x",)):
        term.layer_names = names
        return term(batch_of(torch.zeros(len(t), 3), torch.zeros(len(t), 3), teacher_features={"x": t, "y": t},
                             student_features={"x": s, "y": s})).item()

    assert value(a, b) == pytest.approx(value(a[:1], b[:1]) + value(a[1:], b[1:]), rel=1e-5)
    assert value(a, b, ("x", "y")) == pytest.approx(2 * value(a, b), rel=1e-6)
    assert value(a, a) == pytest.approx(0.0, abs=1e-7)


def linear_cam_model(features):
    """logits = W . spatial mean of the features, so that d logit_c / d A_k = W[c, k] / (U * V)."""
    weight = torch.tensor([[1.0, -0.5], [0.0, 1.0], [-1.0, -1.0]])
    return features.mean(dim=(2, 3)) @ weight.T


def test_cam_term_by_hand():
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]], requires_grad=True)
    student = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [2.0, 0.0]]]], requires_grad=True)
    term = GradCamAlignment(SimpleNamespace(img_size=2, cam_weight=3.0))
    term.layer_names = ("conv",)
    value = term(batch_of(linear_cam_model(teacher), linear_cam_model(student),
                          teacher_features={"conv": teacher}, student_features={"conv": student}))
    # teacher: logits (2.25, 0.5, -3), class 0, weights (1/4, -1/8 -> 0): map (1 2; 3 4) / 4 -> (0 1/3; 2/3 1)
    # student: logits (-0.5, 1.5, -1.75), class 1, weights (0, 1/4): map (2 2; 2 0) / 4 -> (1 1; 1 0)
    expected = 3.0 * ((0 - 1) ** 2 + (1 / 3 - 1) ** 2 + (2 / 3 - 1) ** 2 + (1 - 0) ** 2) / 4
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher's map is a constant target


def test_cam_of_a_flat_map_is_zero_not_nan():
    flat = torch.zeros(2, 2, 3, 3, requires_grad=True)
    constant = torch.ones(2, 2, 3, 3, requires_grad=True)
    term = GradCamAlignment(SimpleNamespace(img_size=3, cam_weight=1.0))
    term.layer_names = ("conv",)
    value = term(batch_of(linear_cam_model(flat), linear_cam_model(constant), teacher_features={"conv": flat},
                          student_features={"conv": constant}))
    assert value.item() == 0.0


def test_reliable_ce_by_hand():
    teacher = torch.tensor([[0.9, 0.1], [0.3, 0.7]]).log()  # difficulties 1 - p(label 0): 0.1 and 0.7
    student = torch.tensor([[1.0, 3.0], [1.0, 1.0]]).log()  # CE against label 0: log 4 and log 2
    batch = batch_of(teacher, student, labels=torch.tensor([0, 0]))
    for tau, expected in ((0.5, math.log(4) / 2), (0.75, (math.log(4) + math.log(2)) / 2), (0.05, 0.0)):
        value = reliable_ce(batch, SimpleNamespace(reliable_ce_tau=tau, reliable_ce_weight=2.0))
        assert value.item() == pytest.approx(2.0 * expected, rel=1e-6, abs=1e-7), tau


def test_pseudo_label_by_hand():
    p = [[0.9, 0.06, 0.04], [0.2, 0.5, 0.3]]
    q = [0.2, 0.5, 0.3]  # the student's probabilities, for both samples
    batch = batch_of(torch.tensor(p).log(), torch.tensor([q, q]).log())
    options = SimpleNamespace(pseudo_label_upper=0.5, pseudo_label_lower=0.2, pseudo_label_beta=0.3,
                              pseudo_label_weight=2.0)
    entropies = [-sum(x * math.log(x) for x in row) / math.log(3) for row in p]
    assert 0.2 < entropies[0] < 0.5 < entropies[1]  # sample 0 is reliable until the threshold falls below it

    def ce(k):
        return -math.log(q[k])

    top2 = 0.3 * (0.5 / 0.8 * ce(1) + 0.3 / 0.8 * ce(2))  # sample 1: top-2 classes 1 and 2
    for progress, first in ((0.0, ce(0)), (1.0, 0.3 * (0.9 / 0.96 * ce(0) + 0.06 / 0.96 * ce(1)))):
        batch.progress = progress
        assert pseudo_label(batch, options).item() == pytest.approx(2.0 * (first + top2) / 2, rel=1e-5), progress


# ----------------------------------------------------------------------------------------- input filter

def test_lowpass_keeps_a_constant_image_and_damps_a_checkerboard():
    options = SimpleNamespace(lowpass_d0=80.0)
    constant = torch.full((2, 3, 32, 32), 0.7)
    assert torch.allclose(lowpass(constant, options), constant, atol=1e-6)
    index = torch.arange(32)
    checkerboard = ((index[:, None] + index[None, :]) % 2 * 2 - 1).float().expand(1, 3, 32, 32)
    d0 = 80 * 32 / 224  # SynQ's D0 = 80 at 224 px, scaled to 32 px
    # all of a checkerboard's energy is at the highest frequency, D^2 = 16^2 + 16^2
    gain = math.exp(-512 / (2 * d0**2))
    assert gain < 0.15
    assert torch.allclose(lowpass(checkerboard, options), gain * checkerboard, atol=1e-5)
    # a slow wave (one period over the image, D = 1) passes almost unchanged
    wave = torch.cos(2 * math.pi * index / 32).float().expand(1, 1, 32, 32)
    assert torch.allclose(lowpass(wave, options), math.exp(-1 / (2 * d0**2)) * wave, atol=1e-5)


# -------------------------------------------------------------------------------- registry and layers

def test_registration_needs_a_docstring_a_base_class_and_a_new_name():
    with pytest.raises(TypeError, match="needs a docstring"):
        register_student_loss("undocumented")(lambda batch, options: 0)
    with pytest.raises(TypeError, match="must subclass StudentLoss"):
        register_student_loss("not_a_term")(type("NotATerm", (), {"__doc__": "x"}))
    with pytest.raises(ValueError, match="'kd' is already registered"):
        register_student_loss("kd")(StudentLoss)
    with pytest.raises(ValueError, match="'lowpass' is already registered"):
        register_input_filter("lowpass")(lowpass)
    assert "undocumented" not in STUDENT_LOSSES and "not_a_term" not in STUDENT_LOSSES


@pytest.mark.parametrize("network, first, count", [("resnet20a_cifar10", "layer1.0", 9),
                                                   ("resnet20_cifar10", "features.stage1.unit1", 9),
                                                   ("torchvision:resnet18", "layer1.0", 8)])
def test_stage_blocks_are_the_residual_blocks(network, first, count):
    blocks = stage_blocks(get_model_spec(network).build())
    assert blocks[0] == first and len(blocks) == count


def test_a_sequence_of_unlike_blocks_is_no_stage():
    # torchvision's MobileNetV2 stacks a conv-BN-ReLU6 block and inverted residuals of another class in one Sequential
    with pytest.raises(MissingLayersError, match="residual blocks"):
        stage_blocks(get_model_spec("torchvision:mobilenet_v2").build())


def test_last_spatial_conv_skips_a_classifier_after_pooling():
    model = get_model_spec("mobilenetv2_w1").build().eval()
    with torch.no_grad():
        name = last_spatial_conv(model, torch.randn(1, 3, 224, 224))
    assert name == "features.final_block.conv"  # not the 1 x 1 classifier "output" after global pooling
    assert last_spatial_conv(get_model_spec("resnet20a_cifar10").build(), torch.randn(1, 3, 32, 32)) == "layer3.2.conv2"


def test_feature_capture_collects_only_inside_capture_and_removes_its_hooks():
    teacher = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    student = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    capture = FeatureCapture({"teacher": teacher, "student": student}, ["0"])
    x = torch.randn(1, 3, 2, 2)
    teacher(x)
    assert capture.outputs == {"teacher": {}, "student": {}}
    with capture.capture():
        teacher(x)
        student(x)
    outputs = capture.take()
    assert torch.equal(outputs["student"]["0"], student[0](x)) and torch.equal(outputs["teacher"]["0"], teacher[0](x))
    assert capture.outputs == {"teacher": {}, "student": {}}  # handed over, not kept
    capture.remove()
    assert not teacher[0]._forward_hooks and not student[0]._forward_hooks
    assert not FeatureCapture({"teacher": teacher}, [])._handles


def test_non_finite_check_names_the_term_not_the_total():
    names = ("loss_G", "marginal", "onehot", "bns", "loss_S", "teacher_acc", "kd", "cam")
    rows = torch.zeros(3, len(names))
    rows[1, names.index("cam")] = rows[1, names.index("loss_S")] = float("nan")
    rows[2] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"loss cam became nan at epoch 1, iteration 12"):
        check_finite(rows, names, 10, 0, torch.device("cpu"), "run")
