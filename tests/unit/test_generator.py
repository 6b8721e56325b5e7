import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.training.generator import ConditionalBNGenerator, LabelEmbeddingGenerator, upsample_conv3x3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (3, 4, 5, 7), (1, 6, 1, 3)])
def test_upsample_conv_equals_conv_of_the_upsampled_input(shape, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 6, 3, padding=1, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    expected = conv(F.interpolate(x, scale_factor=2))
    got = upsample_conv3x3(x, conv)
    assert got.shape == expected.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    assert relative_error(got, expected) < 1e-12  # float64: the same function, only the rounding differs
    upstream = torch.randn_like(expected)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    for g_got, g_expected in zip(torch.autograd.grad(got, params, upstream),
                                 torch.autograd.grad(expected, params, upstream)):
        assert relative_error(g_got, g_expected) < 1e-12


def test_upsample_conv_in_float32_and_channels_last():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(4, 16, 8, 8)
    expected = conv(F.interpolate(x, scale_factor=2))
    assert relative_error(upsample_conv3x3(x, conv), expected) < 1e-5
    channels_last = x.to(memory_format=torch.channels_last)
    assert relative_error(upsample_conv3x3(channels_last, conv.to(memory_format=torch.channels_last)), expected) < 1e-5


@pytest.mark.parametrize("kind", [LabelEmbeddingGenerator, ConditionalBNGenerator])
def test_generator_matches_the_plain_upsample_then_conv(kind):
    torch.manual_seed(0)
    generator = kind(10, 16, 16).double().train()
    z, labels = torch.randn(4, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    g = generator
    x = g.l1(g.embed(z, labels)).view(4, 128, g.init_size, g.init_size)
    x = g.conv1(F.interpolate(g.norm(0, x, labels), scale_factor=2))
    x = g.conv2(F.interpolate(F.leaky_relu(g.norm(1, x, labels), 0.2), scale_factor=2))
    expected = g.out_bn(torch.tanh(g.conv3(F.leaky_relu(g.norm(2, x, labels), 0.2))))
    got = generator(z, labels)
    assert got.shape == (4, 3, 16, 16)
    assert relative_error(got, expected) < 1e-10
