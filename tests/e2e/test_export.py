"""tools/export.py on post-training runs of the shared option-A teacher, ``--eval`` of the exported files, the
networks the exporter handles and its errors."""

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn as nn

from quantization_utils import (
    ACT_QUANTIZERS,
    QuantAct,
    StudentSpec,
    quantize_model,
    register_act_quantizer,
    set_act_tracking,
)
from quantization_utils.act_quantizers import LayerwiseRange
from utils.export.onnx_export import export_onnx
from utils.export.onnx_modules import GRANQ_DEPLOYMENT, deploy_model, onnx_act_modes
from utils.export.runtime import onnx_logits, onnx_session
from utils.models import build_teacher
from utils.runs.config import load_options
from utils.runs.export_cli import main as export_main
from utils.runs.saved import evaluate_saved
from utils.training.checkpoints import student_record

from ..conftest import (
    CIFAR10_CONF,
    CIFAR10_JPEG,
    RESNET20A_WEIGHTS,
    ROOT,
    last_json,
    post_training_args,
    run_main,
)

IMAGENET_CONF = os.path.join(ROOT, "ImageNet", "imagenet_res18.hocon")


def export(*argv):
    """tools/export.py in-process: (exit code, stdout lines, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = export_main([str(a) for a in argv])
    return code, out.getvalue().splitlines(), err.getvalue()


# The exports of the two post-training runs run once, in one worker (pytest-xdist); the runs themselves are the
# session's shared ones (the W4A4 layer-wise run is also test_shared_data.py's).
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module", params=[(3, 3, "granq"), (4, 4, "layerwise")], ids=["W3A3-granq", "W4A4-layerwise"])
def exported(request, shared_run, tmp_path_factory):
    if not (os.path.isdir(CIFAR10_JPEG) and os.path.isfile(RESNET20A_WEIGHTS)):
        pytest.skip("../shared/data (CIFAR-10 JPEG test set and ResNet-20 weights) is not beside the project")
    qw, qa, act_mode = request.param
    run = shared_run(f"A{qw}{act_mode}", post_training_args(qw, qa, act_mode))
    output = tmp_path_factory.mktemp("export")
    code, lines, err = export(run["run_dir"], "--output", output)
    assert code == 0, err
    return run, json.loads(lines[-1]), lines


def test_onnxruntime_gives_the_students_top1(exported):
    run, result, lines = exported
    assert result["test_images"] == 10_000 and result["compared_images"] == 1000
    # The run evaluated this student on the CPU on this test set: its top-1 is the one to meet.
    assert (result["torch_top1"], result["torch_top1_from"]) == (run["best_top1"], "recorded")
    assert abs(result["onnxruntime_top1"] - result["torch_top1"]) <= 0.05
    # Most images agree to float rounding; where a value crosses a rounding boundary a code moves by one
    # step (with GranQ, a range with it), on a few percent of the images.
    assert result["median_logit_difference"] <= 1e-4
    assert 0 <= result["max_logit_difference"] <= 8
    assert result["top1_disagreements"] <= 10
    assert any(line.startswith("test set (10000 images)") for line in lines)


def test_files_are_written_whole_with_their_sizes(exported):
    run, result, lines = exported
    folder = os.path.dirname(result["paths"]["packed"])
    assert sorted(os.listdir(folder)) == ["student.onnx", "student.safetensors"]  # no temporary file left
    for kind, name in (("packed", "student.safetensors"), ("onnx", "student.onnx")):
        assert result["paths"][kind] == os.path.join(folder, name)
        assert result["bytes"][kind] == os.path.getsize(result["paths"][kind])
        assert any(line.startswith(f"{name}: {result['bytes'][kind]:,} bytes") for line in lines)
    saved = torch.load(os.path.join(run["run_dir"], "best_student.pt"), weights_only=False)["student"]
    float_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert result["bytes"]["float_state_dict"] == float_bytes
    if run["qw"] == 3:  # an exact scale and a zero point per 3 x 3 kernel
        assert result["bytes"]["packed"] <= 0.25 * float_bytes


def test_onnx_model_is_valid_and_says_what_it_is(exported):
    import onnx

    run, result, _ = exported
    model = onnx.load(result["paths"]["onnx"])
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    metadata = {p.key: p.value for p in model.metadata_props}
    spec = StudentSpec.from_dict(json.loads(metadata["options"]))  # what the metadata records: the spec's dict and more
    assert {"normalize_mean", "normalize_std", "input_size", "network", "dataset", "deploys_as", "source",
            *spec.to_dict()} == set(metadata) - {"options"}
    assert json.loads(metadata["act_types"]) == ["relu", "relu6"] and metadata["quant_impl"] == spec.impl
    assert json.loads(metadata["normalize_mean"]) == [0.485, 0.456, 0.406]
    assert json.loads(metadata["normalize_std"]) == [0.229, 0.224, 0.225]
    assert int(metadata["input_size"]) == 32 and metadata["network"] == "resnet20a_cifar10"
    assert (metadata["qw"], metadata["qa"], metadata["act_mode"]) == (str(run["qw"]), str(run["qa"]), run["act_mode"])
    assert (metadata["weight_granularity"], metadata["dataset"]) == ("kernel", "cifar10")
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("BatchNormalization") == 19 and ops.count("Conv") == 19
    initializers = {t.name: t for t in model.graph.initializer}
    weight_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert {initializers[n.input[0]].data_type for n in weight_nodes if len(n.input) == 3} == {onnx.TensorProto.INT4}
    assert len([n for n in weight_nodes if len(n.input) == 3]) == 20  # 19 convolutions and the linear layer
    # No weight is stored as float: the float initializers are BatchNorm, bias, scales and small constants.
    assert max(onnx.numpy_helper.to_array(t).size for t in initializers.values()
               if t.data_type == onnx.TensorProto.FLOAT) <= 4096
    if run["act_mode"] == "granq":
        assert metadata["deploys_as"] == GRANQ_DEPLOYMENT
        assert ops.count("ReduceMin") == ops.count("ReduceMax") == 19 and "QuantizeLinear" not in ops
    else:
        assert metadata["deploys_as"] == "QDQ"
        assert ops.count("QuantizeLinear") == 19 and "ReduceMin" not in ops


@pytest.fixture(scope="module")
def test_subset(tmp_path_factory):
    """20 real test images of each class, linked from the shared test set."""
    root = tmp_path_factory.mktemp("subset")
    for label in sorted(os.listdir(CIFAR10_JPEG)):
        os.makedirs(root / label)
        for name in sorted(os.listdir(os.path.join(CIFAR10_JPEG, label)))[:20]:
            os.symlink(os.path.join(CIFAR10_JPEG, label, name), root / label / name)
    return str(root)


def test_eval_of_the_exported_files(exported, test_subset):
    run, result, _ = exported
    saved = evaluate_saved(os.path.join(run["run_dir"], "best_student.pt"), data_path=test_subset, device="cpu")
    summaries = {}
    for kind in ("packed", "onnx"):
        code, lines = run_main(["--eval", result["paths"][kind], "--set", f"dataPath={test_subset}"])
        assert code == 0
        summaries[kind] = last_json(lines)
        assert set(saved) | {"runtime"} == set(summaries[kind])
        assert summaries[kind]["recorded_top1"] == run["best_top1"] and summaries[kind]["act_mode"] == run["act_mode"]
    assert summaries["packed"]["student_top1"] == saved["student_top1"]  # load_packed: the same logits
    assert summaries["packed"]["student_top5"] == saved["student_top5"]
    assert abs(summaries["onnx"]["student_top1"] - saved["student_top1"]) <= 1.0  # 2 of 200 images
    assert summaries["onnx"]["runtime"].startswith("onnxruntime")


# ----------------------------------------------------------------------------------------------------------
# Errors: one line, no traceback, exit code 2.

def _error_line(code, lines, err, match):
    assert code == 2 and not lines
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert match in err.split("error:", 1)[1], err


def _student_file(path, network="tests.e2e.user_models:tiny_net", act_mode="granq", **sets):
    options = load_options(CIFAR10_CONF, [f"network={network}", "quant_impl=eager", f"act_mode={act_mode}",
                                          *(f"{k}={v}" for k, v in sets.items())])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    student = quantize_model(teacher, options.student_spec())
    torch.save(student_record(options.to_dict(), {"seed": 1}, student.state_dict(), epoch=0, top1=None), path)
    return str(path)


def test_bad_inputs_give_one_error_line(tmp_path, monkeypatch):
    _error_line(*export(tmp_path), "holds no best_student.pt")
    (tmp_path / "notes.txt").write_text("not a student")
    _error_line(*export(tmp_path / "notes.txt"), "cannot be read as a PyTorch checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "weights.pt")
    _error_line(*export(tmp_path / "weights.pt"), "is not a student checkpoint")
    _error_line(*export(tmp_path / "missing"), "neither a saved student nor a run directory")
    student = _student_file(tmp_path / "best_student.pt")
    _error_line(*export(student, "--set", "qw=2"), "may change only")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    _error_line(*export(student, "--output", tmp_path / "out"), "needs the package 'onnxruntime'")
    assert not os.path.exists(tmp_path / "out")


def _sign(x, bits):
    """y = sign(x)."""
    return torch.sign(x)


class _LayerwiseAgain(LayerwiseRange):
    """A subclass of the layer-wise quantizer: ONNX forms go by the exact class, so it has none of its own."""


@pytest.mark.parametrize("entry", [_sign, _LayerwiseAgain], ids=["function", "subclass"])
def test_a_quantizer_with_no_onnx_form_packs_but_gets_one_error_line_for_onnx(tmp_path, entry):
    register_act_quantizer("export_test_quantizer")(entry)
    try:
        assert "export_test_quantizer" not in onnx_act_modes()
        student = _student_file(tmp_path / "best_student.pt", act_mode="export_test_quantizer")
        _error_line(*export(student, "--output", tmp_path / "out"), "act_mode 'export_test_quantizer' (layer 2.1) "
                    "has no ONNX form; the quantizers with one: granq, layerwise, channel")
        assert not os.path.exists(tmp_path / "out" / "student.safetensors")  # nothing written
        code, lines, err = export(student, "--output", tmp_path / "out", "--format", "packed")
        assert code == 0 and os.path.isfile(tmp_path / "out" / "student.safetensors"), err  # packing takes any
    finally:
        del ACT_QUANTIZERS["export_test_quantizer"]


class DataDependentNet(nn.Module):
    """A network whose control flow depends on the values: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(x) if x.sum() > 0 else -self.head(x)


def data_dependent_net():
    return DataDependentNet()


def test_a_network_the_exporter_cannot_express(tmp_path):
    student = _student_file(tmp_path / "best_student.pt", network="tests.e2e.test_export:data_dependent_net")
    _error_line(*export(student, "--format", "onnx"), "the ONNX exporter cannot express this student")


# ----------------------------------------------------------------------------------------------------------
# Networks: random weights, W8A8 (one grid step moves a logit little), onnxruntime against the student.

NETWORKS = [
    ("resnet20_cifar10", CIFAR10_CONF, ["act_mode=layerwise"]),
    ("tests.e2e.user_models:tiny_hardswish_net", CIFAR10_CONF, ["act_types=[hardswish]", "weight_granularity=channel"]),
    pytest.param("resnet18", IMAGENET_CONF, [], marks=pytest.mark.slow),
    pytest.param("resnet50", IMAGENET_CONF, ["act_mode=channel"], marks=pytest.mark.slow),
    pytest.param("mobilenetv2_w1", IMAGENET_CONF, [], marks=pytest.mark.slow),
    pytest.param("torchvision:mobilenet_v2", IMAGENET_CONF, ["weight_granularity=channel"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("network, conf, sets", NETWORKS)
def test_networks_run_in_onnxruntime(tmp_path, network, conf, sets):
    options = load_options(conf, [f"network={network}", "quant_impl=eager", *sets], qw=8, qa=8)
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    student = quantize_model(teacher, options.student_spec())
    size = 224 if options.dataset == "imagenet" else options.img_size
    set_act_tracking(student, True)  # tracked ranges, as a run calibrates them
    with torch.no_grad():
        student.eval()(torch.randn(4, 3, size, size))
    set_act_tracking(student, False)
    export_onnx(student, options, str(tmp_path / "student.onnx"))
    session = onnx_session(str(tmp_path / "student.onnx"))
    assert sum(isinstance(m, QuantAct) for m in student.modules()) > 0
    for batch in (1, 3):  # the batch size is dynamic
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference, deployed = student(images), deploy_model(student)(images)
        logits = onnx_logits(session, images)
        assert logits.shape == (batch, options.nClasses)
        assert (logits - reference).abs().max() <= 0.02 * reference.abs().max()
        assert (logits - deployed).abs().max() <= 0.02 * reference.abs().max()
