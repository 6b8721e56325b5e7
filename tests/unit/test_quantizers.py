import numpy as np
import pytest
import torch

from quantization_utils import (
    ActQuant,
    QuantAct,
    channel_fake_quant,
    channel_loop_fake_quant,
    granq_fake_quant,
    layerwise_fake_quant,
    quant_params,
    weight_fake_quant,
)
from quantization_utils.functional import channel_range


def reference_fake_quant(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """The formula, written independently in float32 numpy."""
    x, lo, hi = (np.asarray(a, dtype=np.float32) for a in (x, lo, hi))
    n = np.float32(2**bits - 1)
    scale = n / np.maximum(hi - lo, np.float32(1e-8))
    zero_point = np.round(scale * lo) + np.float32(2 ** (bits - 1))
    q = np.round(scale * x - zero_point)
    return (q + zero_point) / scale


def reference_per_row(x: np.ndarray, leading: int, bits: int) -> np.ndarray:
    rows = x.reshape(*x.shape[:leading], -1)
    lo = rows.min(axis=-1, keepdims=True)
    hi = rows.max(axis=-1, keepdims=True)
    return reference_fake_quant(rows, lo, hi, bits).reshape(x.shape)


def test_hand_computed_two_bit_row():
    # range [-1, 2], 2 bits: scale 1, zero point round(-1) + 2 = 1, grid {-1, 0, 1, 2}
    x = torch.tensor([[-1.0, 0.2, 0.5, 1.6, 2.0]])
    # 0.5 - 1 = -0.5 rounds half to even -> -0 -> 1.0
    assert granq_fake_quant(x, 2).tolist() == [[-1.0, 0.0, 1.0, 2.0, 2.0]]


def test_hand_computed_params():
    scale, zero_point = quant_params(torch.tensor(-0.5), torch.tensor(1.0), bits=3)
    assert scale.item() == pytest.approx(7 / 1.5)
    assert zero_point.item() == round(7 / 1.5 * -0.5) + 4


def test_hand_computed_per_channel_4d():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[0.0, 0.5], [0.6, 6.0]]]])  # [1, 2, 2, 2]
    out = granq_fake_quant(x, 2)
    assert out[0, 0].tolist() == [[0.0, 1.0], [2.0, 3.0]]  # its own range [0, 3]: exact
    assert out[0, 1].tolist() == [[0.0, 0.0], [0.0, 6.0]]  # range [0, 6], step 2


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (16, 3, 7, 7), (6, 33)])
def test_granq_matches_reference_on_random_tensors(bits, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 3
    expected = reference_per_row(x.numpy(), 2 if len(shape) == 4 else 1, bits)
    assert np.array_equal(granq_fake_quant(x, bits).numpy(), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_channels_are_kept(bits):
    x = torch.randn(3, 4, 6, 6)
    x[:, 1] = 2.5
    x[0, 3] = -7.0
    out = granq_fake_quant(x, bits)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 1], x[:, 1], rtol=1e-6)
    assert torch.allclose(out[0, 3], x[0, 3], rtol=1e-6)
    assert np.array_equal(out.numpy(), reference_per_row(x.numpy(), 2, bits))


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_all_negative_ranges(bits):
    x = -torch.rand(4, 6, 5, 5) * 4 - 1  # every value in [-5, -1]
    out = granq_fake_quant(x, bits)
    assert np.array_equal(out.numpy(), reference_per_row(x.numpy(), 2, bits))
    rows, qrows = x.flatten(2), out.flatten(2)
    step = (rows.amax(-1) - rows.amin(-1)) / (2**bits - 1)
    assert (qrows.amin(-1) >= rows.amin(-1) - step / 2 - 1e-5).all()
    assert (qrows.amax(-1) <= rows.amax(-1) + step / 2 + 1e-5).all()
    assert (out < 0).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_at_most_two_to_bits_levels_per_sample_channel(bits):
    x = torch.randn(4, 6, 12, 12) * 5 + 1
    out = granq_fake_quant(x, bits).flatten(2)
    levels = [len(torch.unique(out[n, c])) for n in range(4) for c in range(6)]
    assert max(levels) <= 2**bits
    assert max(levels) >= min(2**bits, 144) // 2  # the grid is actually used


@pytest.mark.parametrize("shape", [(5, 16, 6, 6), (3, 64, 4, 4), (7, 20)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_channel_loop_equals_vectorized(shape, bits):
    x = torch.randn(shape) * 2
    assert torch.equal(channel_loop_fake_quant(x, bits), granq_fake_quant(x, bits))


@pytest.mark.parametrize("quantizer", [
    lambda x: granq_fake_quant(x, 3),
    lambda x: channel_loop_fake_quant(x, 3),
    lambda x: layerwise_fake_quant(x, 3, -0.5, 0.5),
    lambda x: channel_fake_quant(x, 3, torch.linspace(-1, 0, 5), torch.linspace(0.1, 1, 5)),
    lambda x: weight_fake_quant(x, 3, "kernel"),
    lambda x: weight_fake_quant(x, 3, "channel"),
])
def test_straight_through_gradient(quantizer):
    x = torch.randn(4, 5, 3, 3, requires_grad=True)
    upstream = torch.randn(4, 5, 3, 3)
    (quantizer(x) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def test_layerwise_uses_given_range_and_saturates():
    x = torch.tensor([-1.0, 0.0, 1.1, 2.9, 3.0, 10.0])
    out = layerwise_fake_quant(x, 2, 0.0, 3.0)  # grid {0, 1, 2, 3}
    assert out.tolist() == [0.0, 0.0, 1.0, 3.0, 3.0, 3.0]
    inside = torch.rand(100) * 3
    expected = reference_fake_quant(inside.numpy(), np.float32(0.0), np.float32(3.0), 2)
    assert np.array_equal(layerwise_fake_quant(inside, 2, torch.tensor(0.0), torch.tensor(3.0)).numpy(), expected)


def test_channel_uses_each_channels_range_and_saturates():
    # channel 0: [0, 3], grid {0, 1, 2, 3}; channel 1: [-1, 2], grid {-1, 0, 1, 2}; 2 samples of 2 values each
    x = torch.tensor([[[[1.1, 10.0]], [[-0.6, 0.4]]],
                      [[[-1.0, 2.4]], [[1.7, -3.0]]]])
    out = channel_fake_quant(x, 2, torch.tensor([0.0, -1.0]), torch.tensor([3.0, 2.0]))
    assert out.tolist() == [[[[1.0, 3.0]], [[-1.0, 0.0]]],
                            [[[0.0, 2.0]], [[2.0, -1.0]]]]
    lo, hi = torch.tensor([0.0, -1.0, 0.5]), torch.tensor([3.0, 2.0, 0.75])
    inside = lo.view(1, 3, 1, 1) + torch.rand(4, 3, 5, 5) * (hi - lo).view(1, 3, 1, 1)
    expected = reference_fake_quant(inside.numpy(), lo.view(1, 3, 1, 1).numpy(), hi.view(1, 3, 1, 1).numpy(), 3)
    assert np.array_equal(channel_fake_quant(inside, 3, lo, hi).numpy(), expected)
    with pytest.raises(ValueError, match="ranges of shape"):
        channel_fake_quant(inside, 3, lo[:2], hi[:2])


def test_channel_range_is_over_samples_and_positions():
    x = torch.randn(3, 4, 5, 6)
    lo, hi = channel_range(x)
    per_channel = x.numpy().transpose(1, 0, 2, 3).reshape(4, -1)
    assert np.array_equal(lo.numpy(), per_channel.min(1)) and np.array_equal(hi.numpy(), per_channel.max(1))
    rows = torch.tensor([[1.0, -2.0], [3.0, 4.0]])  # [N, F]: one range per feature
    assert [t.tolist() for t in channel_range(rows)] == [[1.0, -2.0], [3.0, 4.0]]


def test_weight_granularities():
    w = torch.randn(8, 4, 3, 3)
    kernel = weight_fake_quant(w, 3, "kernel")
    channel = weight_fake_quant(w, 3, "channel")
    assert np.array_equal(kernel.numpy(), reference_per_row(w.numpy(), 2, 3))
    assert np.array_equal(channel.numpy(), reference_per_row(w.numpy(), 1, 3))
    assert not torch.equal(kernel, channel)
    assert len(torch.unique(kernel[0])) > 2**3  # several grids inside one output channel
    assert len(torch.unique(channel[0])) <= 2**3
    linear = torch.randn(10, 7)
    assert torch.equal(weight_fake_quant(linear, 4, "kernel"), weight_fake_quant(linear, 4, "channel"))
    assert np.array_equal(weight_fake_quant(linear, 4).numpy(), reference_per_row(linear.numpy(), 1, 4))


@pytest.mark.parametrize("bits", [1, 9, 0, 3.0, True, "4"])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8, got"):
        granq_fake_quant(torch.randn(2, 3), bits)
    with pytest.raises(ValueError, match="bits"):
        weight_fake_quant(torch.randn(2, 3), bits)


def test_bad_shapes_and_granularity_raise():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[N, F\]"):
        granq_fake_quant(torch.randn(2, 3, 4), 4)
    with pytest.raises(ValueError, match="granularity"):
        weight_fake_quant(torch.randn(2, 3), 4, "tensor")


def test_each_sample_has_its_own_channel_range():
    # N = 2, C = 2, 2 bits. Channel 0 spans [0, 3] in sample 0 but [0, 6] in sample 1.
    x = torch.tensor([
        [[[0.0, 1.0, 2.0, 3.0]], [[0.0, 0.4, 1.2, 3.0]]],
        [[[0.0, 2.0, 4.0, 6.0]], [[-1.0, 0.0, 0.5, 2.0]]],
    ])
    # By hand, each (sample, channel) row on its own grid of 4 levels:
    # [0, 3]: step 1, exact; [0, 3]: 0.4 -> 0, 1.2 -> 1; [0, 6]: step 2, exact;
    # [-1, 2]: zero point 1, 0.5 - 1 = -0.5 rounds half to even -> 0 -> 1.0.
    expected = torch.tensor([
        [[[0.0, 1.0, 2.0, 3.0]], [[0.0, 0.0, 1.0, 3.0]]],
        [[[0.0, 2.0, 4.0, 6.0]], [[-1.0, 0.0, 1.0, 2.0]]],
    ])
    assert torch.equal(granq_fake_quant(x, 2), expected)
    assert torch.equal(QuantAct(ActQuant(2, "granq", impl="eager"))(x), expected)
    # One range per channel over the batch gives other values: channel 0 of sample 0 on the grid of [0, 6].
    lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
    per_channel = torch.from_numpy(reference_fake_quant(x.numpy(), lo.numpy(), hi.numpy(), 2))
    assert per_channel[0, 0].tolist() == [[0.0, 0.0, 2.0, 4.0]]
    assert not torch.equal(per_channel, expected)
