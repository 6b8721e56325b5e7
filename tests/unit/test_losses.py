import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.losses import BNStatistics, entropy, kd_loss, marginal_loss, onehot_loss


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
    # outside capture() nothing is collected
    model(x)
    assert torch.allclose(stats.loss(), expected, atol=1e-6)
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
