import json
import math
import subprocess
import sys
import types

import pytest
import torch

from quantization_utils import QuantConv2d, StudentSpec, quantize_model, set_act_tracking, weight_fake_quant
from utils.export.codes import bits_for, dequantize, pack_bits, packed_bytes, quantize_weight, unpack_bits
from utils.export.packed import PACKED_FORMAT, load_packed, pack_student, read_packed, save_packed
from utils.models import build_teacher
from utils.models.resnet_a import resnet20a_cifar10
from utils.training.checkpoints import RunFileError

from ..conftest import RESNET20A_WEIGHTS, ROOT, needs_shared_data


def _options(qw, qa, act_mode="granq", weight_granularity="kernel", network="resnet20a_cifar10"):
    return {"qw": qw, "qa": qa, "act_mode": act_mode, "weight_granularity": weight_granularity, "network": network,
            "dataset": "cifar10", "quant_impl": "eager", "act_types": ["relu", "relu6"]}


def _student(options, teacher=None, calibrate=False):
    torch.manual_seed(0)
    teacher = resnet20a_cifar10().eval() if teacher is None else teacher
    student = quantize_model(teacher, StudentSpec.from_dict(options)).eval()
    if calibrate:  # tracked ranges, as a run without training calibrates them
        set_act_tracking(student, True)
        with torch.no_grad():
            student(torch.randn(8, 3, 32, 32))
        set_act_tracking(student, False)
    return student


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip(bits):
    generator = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 8, 9, 1000):
        values = torch.randint(0, 2**bits, (count,), generator=generator)
        values[:1] = 2**bits - 1  # the largest value, where present
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_bytes(count, bits) == math.ceil(count * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, count), values)


def test_bit_packing_is_lsb_first_and_checks_its_input():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert pack_bits(torch.tensor([15, 0]), 4).tolist() == [15]
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 7)
    assert bits_for(-4, 3) == 3 and bits_for(5, 5) == 1


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_codes_give_the_quantized_weight(bits, granularity):
    torch.manual_seed(bits)
    conv = torch.nn.Conv2d(16, 8, 3)
    with torch.no_grad():  # kernels whose values all have one sign: their grid lies away from 0
        conv.weight[:2] = conv.weight[:2].abs() + 0.5
        conv.weight[2:4] = -conv.weight[2:4].abs() - 0.5
    layer = quantize_model(torch.nn.Sequential(conv), StudentSpec.of(bits, 8, granularity=granularity, impl="eager"))[0]
    weight = quantize_weight(layer)
    assert weight.codes.min() >= -(2 ** (bits - 1)) and weight.codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(dequantize(weight), weight_fake_quant(conv.weight, bits, granularity))
    assert weight.rows == (8 * 16 if granularity == "kernel" else 8)


class OneByOneNet(torch.nn.Module):
    """A 1 x 1 convolution (per-kernel ranges of one weight) and a 3 x 3 kernel whose rounding gives it 65 codes
    at 6 bits (s * hi = 38.5 exactly, s * lo just below -24.5)."""

    def __init__(self):
        super().__init__()
        self.tie = torch.nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.point = torch.nn.Conv2d(1, 8, 1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)
        with torch.no_grad():
            self.tie.weight[0, 0] = torch.tensor([[-0.06998378038406372, 0.10997448861598969, 0.0],
                                                  [0.05, -0.03, 0.01], [0.02, 0.07, -0.01]])

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.point(self.tie(x)))).mean((2, 3)))


def test_rows_of_one_weight_and_of_65_codes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = OneByOneNet().eval()
    student = quantize_model(model, StudentSpec.of(6, 8, impl="eager")).eval()
    tie, point = quantize_weight(student.tie), quantize_weight(student.point)
    assert tie.overflow == [(0, -33)]  # one code beyond 6 bits, kept exactly
    assert point.zero_point.abs().min() > 2**24  # ranges of one weight are RANGE_EPS wide
    assert torch.equal(dequantize(point), weight_fake_quant(student.point.weight, 6))
    options = _options(6, 8, network="one_by_one")
    save_packed(student, str(tmp_path / "s.safetensors"), options)
    # A network outside the registry: the registry's lookup stands in for it.
    monkeypatch.setattr("utils.export.common.get_model_spec", lambda name: types.SimpleNamespace(build=OneByOneNet))
    loaded = load_packed(str(tmp_path / "s.safetensors"))
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
@pytest.mark.parametrize("qw", range(2, 9))
def test_packed_student_gives_the_same_logits_bit_for_bit(tmp_path, qw, granularity):
    options = _options(qw, 4, weight_granularity=granularity)
    student = _student(options)
    path = str(tmp_path / "student.safetensors")
    save_packed(student, path, options)
    loaded = load_packed(path)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(qw))
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))
    assert not loaded.training


@pytest.mark.parametrize("act_mode", ["layerwise", "channel"])
def test_packed_student_keeps_the_tracked_ranges(tmp_path, act_mode):
    options = _options(4, 3, act_mode=act_mode, weight_granularity="channel")
    student = _student(options, calibrate=True)
    save_packed(student, str(tmp_path / "s.safetensors"), options)
    loaded = load_packed(str(tmp_path / "s.safetensors"))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), student(images))


def test_the_bit_exact_check_can_fail(tmp_path):
    # Quantizing the stored values again moves some rows: the reload must use them as they are.
    options = _options(3, 3)
    student = _student(options)
    save_packed(student, str(tmp_path / "s.safetensors"), options)
    loaded = load_packed(str(tmp_path / "s.safetensors"))
    for module in loaded.modules():
        if isinstance(module, QuantConv2d):
            module.weight_fn = weight_fake_quant
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(loaded(images), student(images))


def test_packed_file_metadata_and_layout(tmp_path):
    options = _options(3, 3)
    student = _student(options)
    source = {"file": "/runs/x/best_student.pt", "epoch": 0, "top1": 12.5, "meta": {"seed": 2}}
    save_packed(student, str(tmp_path / "s.safetensors"), options, source)
    tensors, metadata = read_packed(str(tmp_path / "s.safetensors"))
    assert metadata["format"] == PACKED_FORMAT
    assert json.loads(metadata["options"]) == options and json.loads(metadata["source"]) == source
    assert {key: metadata[key] for key in ("qw", "qa", "act_mode", "weight_granularity", "network", "dataset")} == {
        "qw": "3", "qa": "3", "act_mode": "granq", "weight_granularity": "kernel", "network": "resnet20a_cifar10",
        "dataset": "cifar10"}
    layers = json.loads(metadata["layers"])
    assert len(layers) == 20 and layers["conv1"]["shape"] == [16, 3, 3, 3] and layers["conv1"]["rows"] == 48
    assert layers["linear"] == {**layers["linear"], "shape": [10, 64], "bits": 3, "rows": 10}
    # Float entries stay as they are; no quantized weight is stored in float.
    state = student.state_dict()
    assert torch.equal(tensors["layer1.0.bn1.running_var"], state["layer1.0.bn1.running_var"])
    assert "conv1.weight" not in tensors and tensors["quantized.codes"].dtype == torch.uint8
    total_codes = sum(math.ceil(math.prod(info["shape"]) * 3 / 8) for info in layers.values())
    assert tensors["quantized.codes"].numel() == total_codes
    assert tensors["quantized.scales"].numel() == sum(info["rows"] for info in layers.values())


@needs_shared_data
@pytest.mark.parametrize("granularity, share", [("kernel", 0.25), ("channel", 0.12)])
def test_packed_w3_resnet20_size(tmp_path, granularity, share):
    teacher, _ = build_teacher("resnet20a_cifar10", RESNET20A_WEIGHTS)
    options = _options(3, 3, weight_granularity=granularity)
    student = _student(options, teacher)
    float_bytes = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    size = save_packed(student, str(tmp_path / "s.safetensors"), options)
    assert size <= share * float_bytes
    assert size > 3 / 32 * float_bytes  # the codes alone take 3/32 of the float weights


def test_a_file_that_is_not_a_packed_student(tmp_path):
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(RunFileError, match="cannot be read as a safetensors file"):
        load_packed(str(tmp_path / "text.safetensors"))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RunFileError, match="not a packed student"):
        load_packed(str(tmp_path / "other.safetensors"))
    with pytest.raises(RunFileError, match="does not exist"):
        load_packed(str(tmp_path / "missing.safetensors"))
    tensors, metadata = pack_student(_student(_options(3, 3)), _options(3, 3))
    tensors["quantized.codes"] = tensors["quantized.codes"][:-5]
    from safetensors.torch import save

    (tmp_path / "short.safetensors").write_bytes(save(tensors, metadata))
    with pytest.raises(RunFileError, match="incomplete or damaged"):
        load_packed(str(tmp_path / "short.safetensors"))


def test_importing_the_export_package_loads_no_runtime_and_no_higher_floor():
    # The layering test checks the imports written down; this one what importing the package loads.
    code = ("import utils.export, sys; print(sorted(m for m in sys.modules if m.startswith(('utils.runs', "
            "'utils.sweeps')) or m in ('onnx', 'onnxruntime', 'safetensors')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
