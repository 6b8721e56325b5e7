"""Any model as the teacher: pytorchcv names, torchvision:NAME, MODULE:FUNCTION; short CPU runs of each."""

import os
import re

import pytest
import torch

from quantization_utils import QuantAct, count_modules
from utils.models import get_model_spec

from ..conftest import CIFAR10_CONF, ROOT, last_json, make_image_folder, run_main, tiny_run_args
from .test_imagenet import imagenet_root, tiny_imagenet_args  # noqa: F401 (a fixture)

CIFAR100_CONF = os.path.join(ROOT, "CIFAR", "cifar100_resnet20.hocon")
# Small members of different families, so that each run takes seconds on a CPU.
PYTORCHCV_CIFAR = ["resnet20_cifar100", "preresnet20_cifar10", "seresnet20_cifar10", "densenet40_k12_cifar10",
                   "resnext20_16x4d_cifar10", "diaresnet20_cifar10", "shakeshakeresnet20_2x16d_cifar10"]
FAST = ["quant_impl=eager", "batchSize=2", "test_batch_size=10"]


@pytest.fixture(scope="module")
def cifar100_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cifar100"), classes=100, per_class=1, size=32)


def float_input_line(run_dir: str) -> str:
    with open(os.path.join(run_dir, "train.log")) as f:
        return next(line for line in f if "Conv2d/Linear layers read inputs" in line)


def check_run(code, lines, network, dataset):
    assert code == 0
    summary = last_json(lines)
    assert (summary["network"], summary["dataset"], summary["epochs"]) == (network, dataset, 1)
    assert summary["student_top1"] is not None
    assert ":" not in os.path.basename(summary["run_dir"])
    checkpoint = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=False)
    assert checkpoint["opt_S"]["state"], "the student optimizer never stepped"
    return summary


@pytest.mark.parametrize("network", PYTORCHCV_CIFAR)
def test_pytorchcv_cifar_models_train(network, tmp_path, cifar_folder, cifar100_folder):
    dataset = network.rsplit("_", 1)[1]
    conf, data = (CIFAR100_CONF, cifar100_folder) if dataset == "cifar100" else (CIFAR10_CONF, cifar_folder)
    sets = [f"network={network}", *FAST]
    code, lines = run_main(tiny_run_args(tmp_path, data, *[a for s in sets for a in ("--set", s)], conf=conf))
    summary = check_run(code, lines, network, dataset)
    # The stem reads the image and the classifier an average: neither follows a quantized activation.
    match = re.search(r"(\d+) of (\d+) Conv2d/Linear layers", float_input_line(summary["run_dir"]))
    assert 2 <= int(match[1]) < int(match[2])


def test_pytorchcv_imagenet_model_trains(tmp_path, imagenet_root):  # noqa: F811
    code, lines = run_main(tiny_imagenet_args("imagenet_MV2", tmp_path, imagenet_root, "network=mobilenetv2_wd4",
                                              "teacher_weights=random", "warmup_epochs=0", *FAST))
    check_run(code, lines, "mobilenetv2_wd4", "imagenet")


# Float inputs: the stem (the image) and the classifier (an average); in MobileNetV2 also the first convolution of
# 16 inverted-residual blocks and the last 1x1 convolution, which read a linear bottleneck's sum.
@pytest.mark.parametrize("network, conf, float_inputs", [("resnet18", "imagenet_res18", "2 of 21"),
                                                         ("mobilenet_v2", "imagenet_MV2", "19 of 53")])
def test_torchvision_models_train_from_their_published_weights(network, conf, float_inputs, tmp_path,
                                                               imagenet_root, torch_hub):  # noqa: F811
    hub, urls = torch_hub
    code, lines = run_main(tiny_imagenet_args(conf, tmp_path, imagenet_root, f"network=torchvision:{network}",
                                              "warmup_epochs=0", *FAST))
    summary = check_run(code, lines, f"torchvision:{network}", "imagenet")
    assert len(urls) == 1 and summary["teacher_weights"] == str(hub / "checkpoints" / os.path.basename(urls[0]))
    assert f" {float_inputs} Conv2d/Linear layers" in float_input_line(summary["run_dir"])


@pytest.fixture
def user_weights(tmp_path):
    def save(function: str) -> str:
        path = tmp_path / f"{function}.pth"
        torch.save(get_model_spec(f"tests.e2e.user_models:{function}").build().state_dict(), path)
        return str(path)

    return save


def test_user_model_trains_and_its_student_is_evaluated_again(tmp_path, cifar_folder, user_weights):
    network = "tests.e2e.user_models:tiny_net"
    code, lines = run_main(tiny_run_args(tmp_path, cifar_folder, "--set", f"network={network}", "--set",
                                         f"teacher_weights={user_weights('tiny_net')}", "--set", "quant_impl=eager"))
    summary = check_run(code, lines, network, "cifar10")
    assert summary["teacher_weights"] == user_weights("tiny_net")
    assert float_input_line(summary["run_dir"]).rstrip().endswith(
        "2 of 3 Conv2d/Linear layers read inputs that no quantized activation (act_types = ['relu', 'relu6']) "
        "precedes, so they compute on float inputs: 0, 8")
    code, lines = run_main(["--eval", summary["run_dir"]])
    assert code == 0 and last_json(lines)["student_top1"] == summary["student_top1"]


@pytest.mark.parametrize("act_types, quant_acts, float_inputs", [
    ("[relu, relu6]", 0, "3 of 3"),  # the default leaves Hardswish, and so every input, in float
    ("[hardswish]", 2, "2 of 3"),
])
def test_act_types_quantize_after_hardswish(act_types, quant_acts, float_inputs, tmp_path, cifar_folder,
                                            user_weights):
    network = "tests.e2e.user_models:tiny_hardswish_net"
    sets = [f"network={network}", f"teacher_weights={user_weights('tiny_hardswish_net')}", "quant_impl=eager",
            f"act_types={act_types}"]
    code, lines = run_main(tiny_run_args(tmp_path, cifar_folder, *[a for s in sets for a in ("--set", s)]))
    summary = check_run(code, lines, network, "cifar10")
    assert f"{float_inputs} Conv2d/Linear layers" in float_input_line(summary["run_dir"])
    from utils.runs.saved import load_quantized_model

    student = load_quantized_model(summary["run_dir"])  # rebuilt with the saved act_types
    assert count_modules(student, QuantAct) == quant_acts
    code, lines = run_main(["--eval", summary["run_dir"]])
    assert code == 0 and last_json(lines)["student_top1"] == summary["student_top1"]


def test_start_up_log_names_float_inputs_and_float_layers(caplog):
    from quantization_utils import StudentSpec, quantize_model
    from utils.runs.config import load_options
    from utils.runs.run import log_unquantized_inputs

    from .user_models import MaskedConv

    model = torch.nn.Sequential(MaskedConv(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1))
    student = quantize_model(model, StudentSpec.of(4, 4, impl="eager"))
    with caplog.at_level("INFO", logger="granq"):
        names = log_unquantized_inputs(student, load_options(CIFAR10_CONF), torch.device("cpu"))
    assert names == ["0"]
    assert ("1 of 2 Conv2d/Linear layers read inputs that no quantized activation (act_types = ['relu', 'relu6']) "
            "precedes, so they compute on float inputs: 0") in caplog.text
    assert "1 layers are subclasses of Conv2d/Linear with their own forward and keep float weights: 0" in caplog.text
    assert "activation quantizers are called at several places" not in caplog.text


def test_start_up_log_warns_of_one_range_for_a_reused_activation(caplog):
    from quantization_utils import StudentSpec, quantize_model
    from utils.runs.config import load_options
    from utils.runs.run import log_unquantized_inputs

    from .user_models import reused_relu_net

    options = load_options(CIFAR10_CONF, overrides=["act_mode=layerwise"])
    student = quantize_model(reused_relu_net(), StudentSpec.of(4, 4, mode="layerwise", impl="eager"))
    with caplog.at_level("INFO", logger="granq"):
        log_unquantized_inputs(student, options, torch.device("cpu"))
    assert ("1 activation quantizers are called at several places per forward (one activation module reused), "
            "so each keeps one range for all its places (act_mode = layerwise): relu.1 x2") in caplog.text

