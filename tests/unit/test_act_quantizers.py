import pytest
import torch
import torch.nn as nn

from quantization_utils import (
    ACT_QUANTIZERS,
    ActQuant,
    ActQuantizer,
    QuantAct,
    StudentSpec,
    act_quantizer_names,
    channel_fake_quant,
    quantize_model,
    rebuild_student,
    register_act_quantizer,
    set_act_tracking,
)
from quantization_utils.act_quantizers import all_reduce_range

BUILT_IN = ("granq", "layerwise", "channel")


@pytest.fixture
def registry():
    """Names registered by a test are removed afterwards."""
    before = set(ACT_QUANTIZERS)
    yield
    for name in set(ACT_QUANTIZERS) - before:
        del ACT_QUANTIZERS[name]


def test_built_in_names():
    assert act_quantizer_names() == BUILT_IN


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"no activation quantizer is registered as 'percentile'; the registered "
                                         r"ones: granq, layerwise, channel"):
        QuantAct(ActQuant(4, "percentile"))


def test_one_decorated_class_is_a_quantizer_with_state(registry):
    @register_act_quantizer("clip_count")
    class ClipAndCount(ActQuantizer):
        """y = clamp(x, -1, 1); counts the forwards while tracking."""

        tracks_ranges = True

        def init_state(self, act):
            act.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def __call__(self, act, x):
            if act.tracking:
                act.calls += 1
            return x.clamp(-1, 1)

    assert act_quantizer_names()[-1] == "clip_count"
    student = quantize_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), StudentSpec.of(8, 4, mode="clip_count"))
    act = student[1][1]
    assert act.tracks_ranges and list(act.state_dict()) == ["calls"] and "mode=clip_count" in repr(act)
    x = torch.tensor([[5.0, 0.25, -3.0, 0.5]])
    assert torch.equal(act(x), torch.tensor([[1.0, 0.25, -1.0, 0.5]]))
    set_act_tracking(student, False)
    act(x)
    assert act.calls.item() == 1


def test_one_decorated_function_is_a_stateless_quantizer(registry):
    @register_act_quantizer("bits_times_sign")
    def bits_times_sign(x, bits):
        """y = bits * sign(x)."""
        return bits * torch.sign(x)

    act = QuantAct(ActQuant(3, "bits_times_sign"))
    assert not act.tracks_ranges and not list(act.buffers())
    assert act(torch.tensor([-2.0, 0.0, 0.5])).tolist() == [-3.0, 0.0, 3.0]


def test_registration_needs_a_formula_a_new_name_and_the_base_class(registry):
    with pytest.raises(TypeError, match="needs a docstring"):
        register_act_quantizer("nodoc")(lambda x, bits: x)
    with pytest.raises(ValueError, match="'granq' is already registered"):
        register_act_quantizer("granq")(type("Other", (ActQuantizer,), {"__doc__": "y = x"}))
    with pytest.raises(TypeError, match="must subclass ActQuantizer"):
        register_act_quantizer("plain")(type("Plain", (), {"__doc__": "y = x"}))
    assert act_quantizer_names() == BUILT_IN


def test_channel_hand_computed_moving_average_and_freezing():
    act = QuantAct(ActQuant(2, "channel", momentum=0.9))
    assert act.x_min.shape == (0,) and act.tracks_ranges
    first = torch.tensor([[[-1.0, 3.0]], [[0.0, 6.0]]]).view(1, 2, 1, 2)  # channel ranges [-1, 3] and [0, 6]
    act(first)
    assert act.x_min.tolist() == pytest.approx([-1.0, 0.0]) and act.x_max.tolist() == pytest.approx([3.0, 6.0])
    act(torch.tensor([[[0.0, 5.0]], [[2.0, 2.0]]]).view(1, 2, 1, 2))
    # bias-corrected average per channel: (0.9*0.1*m1 + 0.1*m2) / (1 - 0.81)
    assert act.x_min.tolist() == pytest.approx([(0.09 * -1 + 0.1 * 0) / 0.19, (0.09 * 0 + 0.1 * 2) / 0.19])
    assert act.x_max.tolist() == pytest.approx([(0.09 * 3 + 0.1 * 5) / 0.19, (0.09 * 6 + 0.1 * 2) / 0.19])
    act.fix()
    frozen = act.x_max.clone()
    x = torch.randn(3, 2, 4, 4) * 10
    assert torch.equal(act(x), channel_fake_quant(x, 2, act.x_min, act.x_max))
    assert torch.equal(act.x_max, frozen)
    act.unfix()
    act(x)
    assert (act.x_max > frozen).all()


def test_channel_tracks_each_channel_by_the_layerwise_rule():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5) * (c + 1) for c in range(5)]
    channel = QuantAct(ActQuant(3, "channel", momentum=0.8))
    layerwise = [QuantAct(ActQuant(3, "layerwise", momentum=0.8)) for _ in range(3)]
    for step, x in enumerate(batches):
        if step == 3:
            set_act_tracking(channel, False)
            for act in layerwise:
                act.fix()
        channel(x)
        for c, act in enumerate(layerwise):
            act(x[:, c])
    for name in ("running_min", "running_max", "x_min", "x_max"):
        assert torch.equal(getattr(channel, name), torch.stack([getattr(a, name) for a in layerwise])), name
    assert torch.equal(channel.momentum_power, layerwise[0].momentum_power)


def test_channel_ranges_must_exist_and_fit():
    act = QuantAct(ActQuant(4, "channel"))
    act.fix()
    with pytest.raises(RuntimeError, match="channel ranges of this QuantAct are empty"):
        act(torch.rand(2, 3, 4, 4))
    act.unfix()
    act(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="tracks 3 channel ranges but got an activation of shape"):
        act(torch.rand(2, 5, 4, 4))


def _small_network():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5), nn.ReLU())


def test_saved_channel_student_reloads_exactly():
    torch.manual_seed(0)
    model = _small_network().eval()
    spec = StudentSpec.of(4, 3, mode="channel")
    student = quantize_model(model, spec)
    with torch.no_grad():
        for _ in range(3):
            student(torch.randn(8, 3, 10, 10))
    set_act_tracking(student, False)
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    assert saved["2.1.x_min"].shape == (4,) and saved["4.1.x_max"].shape == (6,) and saved["8.1.x_min"].shape == (5,)
    rebuilt = rebuild_student(_small_network(), spec, saved)
    assert rebuilt.state_dict().keys() == saved.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())
    images = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), student(images))
    # sized ranges keep their size: a student of another width does not load
    wrong = {**saved, "2.1.x_min": torch.zeros(7)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        rebuilt.load_state_dict(wrong)


def test_single_process_range_is_not_reduced():
    lo, hi = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    out_lo, out_hi = all_reduce_range(lo, hi)
    assert out_lo is lo and out_hi is hi
