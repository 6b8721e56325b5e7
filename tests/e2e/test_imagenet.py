"""ImageNet: configs, validation folder, quantized ResNet-18/50 and MobileNetV2, CPU runs, run scripts."""

import json
import logging
import os
import subprocess
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import utils.models.registry as models
from quantization_utils import QuantAct, QuantConv2d, QuantLinear, StudentSpec, quantize_model
from quantization_utils.quantize import ACTIVATIONS, count_modules
from utils.data.loaders import build_test_loader
from utils.models import get_model_spec
from utils.runs.config import load_options
from utils.system.errors import UserError

from ..conftest import ROOT, last_json, make_image_folder, run_main

IMAGENET = os.path.join(ROOT, "ImageNet")
CONFIGS = {"imagenet_res18": "resnet18", "imagenet_res50": "resnet50", "imagenet_MV2": "mobilenetv2_w1"}
# 1000 class folders with made-up WordNet-style ids; only these few hold images, so a run evaluates
# a handful of images while the class count matches the models' 1000 outputs.
CLASSES_WITH_IMAGES = (0, 417, 999)


def conf(name: str) -> str:
    return os.path.join(IMAGENET, f"{name}.hocon")


def wnids(count: int = 1000) -> list[str]:
    rng = np.random.default_rng(3)
    return [f"n{i:08d}" for i in sorted(rng.choice(10**8, size=count, replace=False))]


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory):
    """A parent folder holding val/<wnid>/*.JPEG, folders created in shuffled order."""
    root = tmp_path_factory.mktemp("imagenet")
    names = wnids()
    rng = np.random.default_rng(4)
    for index in rng.permutation(len(names)):
        folder = root / "val" / names[index]
        folder.mkdir(parents=True)
        if index in CLASSES_WITH_IMAGES:
            pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{index:08d}.JPEG")
    return str(root)


def imagenet_options(data_path, *sets, name="imagenet_res18"):
    return load_options(conf(name), [f"dataPath={data_path}", "nThreads=0", "test_batch_size=8", *sets])


# --------------------------------------------------------------------------------------------- configs
OFFICIAL = {  # paper_numbers.md: warm-up, lr_S, lr_S steps, lambda_l
    "imagenet_res18": (50, 1e-5, [350, 400], 0.1),
    "imagenet_res50": (50, 1e-4, [150, 300, 400], 0.4),
    "imagenet_MV2": (4, 1e-5, [350, 400], 0.1),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_hold_the_official_values(name):
    o = load_options(conf(name))
    assert (o.dataset, o.network, o.nClasses, o.img_size, o.generator_kind) == (
        "imagenet", CONFIGS[name], 1000, 224, "conditional_bn")
    assert (o.nEpochs, o.batchSize, o.iters_per_epoch, o.lr_G, o.temperature, o.latent_dim) == (
        400, 16, 200, 1e-3, 5.0, 100)
    assert (o.alpha_ds, o.alpha_as, o.lambda_u, o.beta, o.gamma, o.momentum, o.weightDecay) == (
        0.2, 0.1, 0.8, 1.0, 1.0, 0.9, 1e-4)
    assert (o.warmup_epochs, o.lr_S, o.step_S, o.lambda_l) == OFFICIAL[name]


@pytest.mark.parametrize("name", CONFIGS)
def test_evaluation_starts_where_the_official_code_starts(name):
    o = load_options(conf(name))
    evaluated = [epoch for epoch in range(o.nEpochs) if o.evaluates_after(epoch)]
    # The official code evaluates when epoch > warmup_epochs - 2 (0-based epochs).
    assert evaluated == [epoch for epoch in range(o.nEpochs) if epoch > o.warmup_epochs - 2]


# ------------------------------------------------------------------------------------ validation data
def test_class_index_is_the_sorted_folder_order(imagenet_root, caplog):
    with caplog.at_level(logging.WARNING):
        loader = build_test_loader(imagenet_options(imagenet_root))
    names = wnids()
    assert loader.dataset.classes == names
    assert sorted(label for _, label in loader.dataset.samples) == list(CLASSES_WITH_IMAGES)
    for path, label in loader.dataset.samples:
        assert os.path.basename(os.path.dirname(path)) == names[label]
    assert "997 of the 1000 class folders" in caplog.text


def test_validation_transform_resizes_crops_and_normalises(tmp_path):
    names = wnids()
    colour = (200, 30, 90)
    for name in names:
        (tmp_path / name).mkdir()
    Image.new("RGB", (500, 375), colour).save(tmp_path / names[5] / "wide.JPEG", quality=100)
    images, labels = next(iter(build_test_loader(imagenet_options(tmp_path))))
    assert images.shape == (1, 3, 224, 224) and labels.tolist() == [5]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor(colour) / 255 - mean) / std
    # JPEG coding moves a flat colour by a level or two.
    assert torch.allclose(images[0].mean(dim=(1, 2)), expected, atol=3 / 255 / 0.224)


def test_missing_validation_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist: point it to an ImageNet validation ImageFolder"):
        build_test_loader(imagenet_options(tmp_path / "nowhere"))
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="holds no class folders of images"):
        build_test_loader(imagenet_options(tmp_path))


def test_wrong_number_of_classes_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "val", classes=10, per_class=1, size=32)
    with pytest.raises(UserError, match="has 10 class folders but nClasses = 1000"):
        build_test_loader(imagenet_options(tmp_path))


# ---------------------------------------------------------------------------------- quantized models
@pytest.fixture(scope="module")
def float_models():
    return {name: get_model_spec(name).build().eval() for name in CONFIGS.values()}


@pytest.mark.parametrize("network", CONFIGS.values())
def test_quant_act_after_every_activation(network, float_models):
    teacher = float_models[network]
    student = quantize_model(teacher, StudentSpec.of(4, 4))
    activations = {name: type(m) for name, m in teacher.named_modules() if isinstance(m, ACTIVATIONS)}
    assert len(activations) == count_modules(student, QuantAct) > 0
    student_modules = dict(student.named_modules())
    for name, kind in activations.items():
        wrapped = student_modules[name]
        assert isinstance(wrapped, nn.Sequential) and type(wrapped[0]) is kind and isinstance(wrapped[1], QuantAct)
    assert count_modules(student, QuantConv2d) == count_modules(teacher, nn.Conv2d) > 0
    assert count_modules(student, QuantLinear) == count_modules(teacher, nn.Linear)
    unquantized = [n for n, m in student.named_modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, (QuantConv2d, QuantLinear))]
    assert unquantized == []

    calls = []
    hooks = [m.register_forward_hook(lambda *args: calls.append(1)) for m in student.modules()
             if isinstance(m, QuantAct)]
    with torch.no_grad():
        assert student(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(activations)  # each QuantAct runs once per forward


def test_mobilenetv2_relu6_depthwise_pointwise_and_classifier(float_models):
    teacher = float_models["mobilenetv2_w1"]
    assert count_modules(teacher, nn.ReLU) == 0 and count_modules(teacher, nn.ReLU6) == 36
    student = quantize_model(teacher, StudentSpec.of(3, 3, granularity="channel"))
    convs = [m for m in student.modules() if isinstance(m, QuantConv2d)]
    depthwise = [m for m in convs if m.groups == m.in_channels > 1]
    pointwise = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(depthwise) == 17 and all(m.weight_bits == 3 for m in convs)
    assert isinstance(student.output, QuantConv2d) and student.output.kernel_size == (1, 1)
    assert student.output.out_channels == 1000 and student.output in pointwise
    for layer in [depthwise[0], pointwise[0], student.output]:
        w = layer.quantized_weight().detach().flatten(1)
        levels = max(len(torch.unique(row)) for row in w)
        assert 2 <= levels <= 2**3 < w.shape[1]

    # With one range per (out, in) kernel (the official GranQ weights), a 3 x 3 depthwise kernel
    # is quantized, but a 1 x 1 kernel is a single value that its own range reproduces: pointwise
    # convolutions and the classifier then stay in float, as docs/imagenet.md says.
    kernel_wise = quantize_model(teacher, StudentSpec.of(3, 3, granularity="kernel"))
    dw = next(m for m in kernel_wise.modules() if isinstance(m, QuantConv2d) and m.groups == m.in_channels > 1)
    assert max(len(torch.unique(k)) for k in dw.quantized_weight().detach().flatten(1)) <= 2**3 < 9
    classifier = kernel_wise.output
    assert torch.allclose(classifier.quantized_weight(), classifier.weight, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------- runs
def tiny_imagenet_args(name, save_path, data_path, *sets):
    args = ["--conf_path", conf(name), "--id", "1", "--qw", "4", "--qa", "4"]
    for s in (f"save_path={save_path}", f"dataPath={data_path}", "nEpochs=1", "iters_per_epoch=2",
              "batchSize=2", "nThreads=0", "test_batch_size=4", *sets):
        args += ["--set", s]
    return args


@pytest.mark.parametrize("name", CONFIGS)
def test_two_iterations_on_cpu_write_a_summary(name, tmp_path, imagenet_root):
    # warmup_epochs=0: the single epoch also trains the student.
    code, lines = run_main(tiny_imagenet_args(name, tmp_path, imagenet_root, "teacher_weights=random",
                                              "warmup_epochs=0"))
    assert code == 0
    summary = last_json(lines)
    assert (summary["network"], summary["dataset"], summary["epochs"], summary["teacher_weights"]) == (
        CONFIGS[name], "imagenet", 1, "random")
    assert summary["student_top1"] is not None  # evaluated after the last epoch despite eval_start_epoch
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    checkpoint = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), mmap=True, weights_only=False)
    assert checkpoint["opt_S"]["state"], "the student optimizer never stepped"


def test_published_teacher_file_is_recorded(tmp_path, imagenet_root, monkeypatch):
    """The pytorchcv download is mocked; the summary names the file pytorchcv stores."""
    from pytorchcv.models.common import model_store

    cache = tmp_path / "cache"
    monkeypatch.setattr(models, "MODEL_CACHE", str(cache))
    error, sha1, release = model_store.get_model_name_suffix_data("resnet18")
    expected = f"resnet18-{error}-{sha1[:8]}.pth"
    reference = get_model_spec("resnet18").build().state_dict()
    urls = []

    def fake_download(url, path=None, overwrite=False, sha1_hash=None, **kwargs):
        urls.append(url)
        inner = os.path.basename(path)[: -len(".zip")]
        torch.save(reference, tmp_path / inner)
        with zipfile.ZipFile(path, "w") as zf:
            zf.write(tmp_path / inner, inner)
        return path

    monkeypatch.setattr(model_store, "_download", fake_download)
    monkeypatch.setattr(model_store, "_check_sha1", lambda *args: True)
    code, lines = run_main(tiny_imagenet_args("imagenet_res18", tmp_path / "runs", imagenet_root, "nEpochs=0"))
    assert code == 0
    assert urls == [f"https://github.com/osmr/imgclsmob/releases/download/{release}/{expected}.zip"]
    assert last_json(lines)["teacher_weights"] == str(cache / expected)


# ------------------------------------------------------------------------------------------ scripts
SCRIPTS = {f"run_{bits}bit_{short}.sh": (f"imagenet_{short}", bits)
           for bits in (3, 4, 5) for short in ("res18", "res50", "MV2")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_scripts_pick_config_and_bits_and_pass_arguments_on(script, tmp_path):
    config, bits = SCRIPTS[script]
    # PYTHON=echo shows the command line the script would run, without starting Python.
    result = subprocess.run(["bash", os.path.join(IMAGENET, script), "--set", "nEpochs=1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHON": "echo"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [os.path.join(IMAGENET, "main.py"), "--conf_path", conf(config), "--id", "1",
                                     "--qw", str(bits), "--qa", str(bits), "--set", "nEpochs=1"]
    assert os.path.isfile(conf(config))


def test_run_script_reaches_main(tmp_path):
    # An unknown key proves the arguments reach main.py after the script's config loaded.
    result = subprocess.run(["bash", os.path.join(IMAGENET, "run_3bit_MV2.sh"), "--set", "no_such_key=1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unknown config key(s): no_such_key" in result.stderr and result.stdout == ""
