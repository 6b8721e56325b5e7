"""Model registry: teachers by name, with their dataset, class count and pretrained weights."""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import math
import os
import sys
import typing
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .locks import fetching

__all__ = ["EvalTransform", "ModelSpec", "build_teacher", "check_teacher", "example_image", "fetch_teacher_weights",
           "get_model_spec", "load_weights_file", "model_names", "register_model"]

logger = logging.getLogger(__name__)

MODEL_CACHE = os.path.join("~", ".torch", "models")  # pytorchcv's default store


@dataclass(frozen=True)
class EvalTransform:
    """How test images are prepared for a model: shorter side resized to ``resize``, centre crop of ``crop``
    (``None``: neither, the images are used at their size), then normalised with ``mean`` and ``std``."""

    resize: int | None
    crop: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value


@dataclass(frozen=True)
class ModelSpec:
    """What a network name stands for. ``dataset``, ``num_classes`` and ``image_size`` are ``None`` for a
    user's own model (``MODULE:FUNCTION``), whose config gives them."""

    name: str
    dataset: str | None
    num_classes: int | None
    image_size: int | None
    build: Callable[[], nn.Module]  # random initialisation
    fetch_published: Callable[[], str] | None  # downloads (or finds) the published weights, returns the file path
    eval_transform: EvalTransform | None = None  # None: the dataset's (utils/data.py)
    ignored_keys: tuple[str, ...] = ()  # prefixes of weight-file keys the built model lacks (auxiliary heads)


_REGISTRY: dict[str, ModelSpec] = {}
TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_CROP_RATIO = 0.875  # 224 / 256: the crop's share of the resized shorter side


def register_model(name: str, dataset: str, num_classes: int, image_size: int,
                   fetch_published: Callable[[], str]):
    """Decorator registering a zero-argument builder under ``name``."""

    def decorator(build: Callable[[], nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, dataset, num_classes, image_size, build, fetch_published)
        return build

    return decorator


def model_names() -> list[str]:
    """The models registered here by name; pytorchcv, torchvision and user models are resolved on demand."""
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name``: a registered model, a pytorchcv classification model (``resnet56_cifar100``),
    ``torchvision:NAME`` (``torchvision:resnet18``) or ``MODULE:FUNCTION`` (a user's function that returns
    an ``nn.Module``). Nothing is built; a user's module is imported. Raises UserError for an unknown name."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_spec(name[len(TORCHVISION_PREFIX):])
    if ":" in name:
        return _user_spec(name)
    return _pytorchcv_spec(name)


def _unknown(name: str, why: str = "", candidates: typing.Iterable[str] = ()) -> UserError:
    close = difflib.get_close_matches(name, list(candidates), n=5)
    return UserError(
        f"network = {name!r} is unknown{why}. Give a pytorchcv classification model (e.g. resnet20_cifar10, "
        f"resnet56_cifar100, wrn16_10_cifar10, resnet18, mobilenetv2_w1), torchvision:NAME for a torchvision "
        f"ImageNet model (e.g. torchvision:resnet18, torchvision:mobilenet_v2), MODULE:FUNCTION for your own "
        f"model (e.g. mypkg.models:my_net, a function returning an nn.Module), or a model registered here "
        f"({', '.join(model_names())})" + (f"; close names: {', '.join(close)}" if close else ""))


# ---------------------------------------------------------------------------------------------------
# pytorchcv models: built by the package, published weights from its model store. The dataset comes from
# the name: a _cifar10 / _cifar100 suffix, else ImageNet; input size and crop from pytorchcv's table.

CIFAR_SUFFIXES = {"_cifar10": ("cifar10", 10), "_cifar100": ("cifar100", 100)}
# Suffixes of pytorchcv models trained on other data (detection, segmentation, SVHN, CUB, ...).
OTHER_DATA_SUFFIXES = ("_svhn", "_cub", "_coco", "_voc", "_cityscapes", "_ade20k", "_celebamaskhq", "_widerface",
                       "_things")


@functools.cache
def _pytorchcv_table() -> dict[str, dict[str, str]]:
    """pytorchcv's model table (published weights, their test set, input size, crop ratio) by model name."""
    from pytorchcv.models.common.model_store import get_model_metainfos_file_path, load_csv

    rows = load_csv(get_model_metainfos_file_path())
    return {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}


def _pytorchcv_fetch(name: str) -> Callable[[], str]:
    def fetch() -> str:
        from pytorchcv.models.common.model_store import get_model_file

        # pytorchcv downloads a zip beside the weights file, extracts it in place and deletes it.
        with fetching(os.path.join(os.path.expanduser(MODEL_CACHE), name)):
            return get_model_file(name, local_model_store_dir_path=MODEL_CACHE)

    return fetch


@functools.cache
def _pytorchcv_spec(name: str) -> ModelSpec:
    from pytorchcv.model_provider import _models

    if name not in _models:
        raise _unknown(name, candidates=[n for n in _models if not n.endswith(OTHER_DATA_SUFFIXES)])
    row = _pytorchcv_table().get(name, {})
    trained_on = row.get("test_dataset", "NA")
    suffix = next((s for s in CIFAR_SUFFIXES if name.endswith(s)), None)
    if name.endswith(OTHER_DATA_SUFFIXES) or (suffix is None and trained_on not in ("in1k", "NA")):
        raise _unknown(name, f": pytorchcv's {name} is not an ImageNet or CIFAR classification model")

    def build() -> nn.Module:
        from pytorchcv.model_provider import get_model

        return get_model(name, pretrained=False)

    if suffix is not None:
        dataset, num_classes = CIFAR_SUFFIXES[suffix]
        return ModelSpec(name, dataset, num_classes, 32, build, _pytorchcv_fetch(name))
    size = int(row["img_size"]) if row.get("img_size", "NA").isdigit() else 224
    crop_ratio = float(row["img_scale"]) if row.get("img_scale", "NA") != "NA" else IMAGENET_CROP_RATIO
    transform = EvalTransform(math.ceil(size / crop_ratio), size, *IMAGENET_MEAN_STD)
    return ModelSpec(name, "imagenet", 1000, size, build, _pytorchcv_fetch(name), transform)


# ---------------------------------------------------------------------------------------------------
# torchvision ImageNet models: weights and test transforms of the default weights enum, downloaded
# into torch.hub's cache by torchvision.

# Arguments that torchvision's builders set when they load published weights; evaluation never runs the
# auxiliary heads, whose BatchNorm layers would see no input for the BN-statistics loss.
_TORCHVISION_ARGS = {
    "googlenet": ({"transform_input": True, "aux_logits": False, "init_weights": False}, ("aux1.", "aux2.")),
    "inception_v3": ({"transform_input": True, "aux_logits": False, "init_weights": False}, ("AuxLogits.",)),
}


def _torchvision_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)  # classification models only


@functools.cache
def _torchvision_spec(name: str) -> ModelSpec:
    import torchvision.models

    if name not in _torchvision_names():
        raise _unknown(TORCHVISION_PREFIX + name, candidates=[TORCHVISION_PREFIX + n for n in _torchvision_names()])
    weights = torchvision.models.get_model_weights(name).DEFAULT
    preset = weights.transforms()
    transform = EvalTransform(preset.resize_size[0], preset.crop_size[0], tuple(preset.mean), tuple(preset.std),
                              preset.interpolation.value)
    kwargs, ignored = _TORCHVISION_ARGS.get(name, ({}, ()))

    def build() -> nn.Module:
        return torchvision.models.get_model(name, weights=None, **kwargs)

    def fetch() -> str:
        # torchvision's own download into torch.hub's cache, hash-checked; the cached file is loaded below.
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        with fetching(path):
            weights.get_state_dict(progress=True, check_hash=True)
        return path

    return ModelSpec(TORCHVISION_PREFIX + name, "imagenet", len(weights.meta["categories"]), preset.crop_size[0],
                     build, fetch, transform, ignored)


# ---------------------------------------------------------------------------------------------------
# A user's own model: MODULE:FUNCTION, imported from the Python path or the current directory.

def _user_spec(name: str) -> ModelSpec:
    module_name, _, function_name = name.partition(":")
    if not (all(part.isidentifier() for part in module_name.split(".")) and function_name.isidentifier()):
        raise _unknown(name)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may raise anything on import
        raise UserError(f"network = {name!r}: cannot import {module_name!r} ({type(error).__name__}: {error}); "
                        f"put it on PYTHONPATH or run from the folder that holds it (MODULE:FUNCTION names your own "
                        f"model; a torchvision model is torchvision:NAME)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"network = {name!r}: module {module_name!r} has no function {function_name!r}")

    def build() -> nn.Module:
        model = function()
        if not isinstance(model, nn.Module):
            raise UserError(f"network = {name!r}: {function_name}() returned a {type(model).__name__}, "
                            f"not an nn.Module")
        return model

    return ModelSpec(name, None, None, None, build, None)


# ---------------------------------------------------------------------------------------------------
# Option-A ResNet-20 (He et al. 2016, section 4.2), key layout of akamaster/pytorch_resnet_cifar10.

RESNET20A_URL = ("https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/master/"
                 "pretrained_models/resnet20-12fca82f.th")
RESNET20A_SHA256_PREFIX = "12fca82f"


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels, no parameters."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes // 4) if stride != 1 or in_planes != planes else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20A(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for index, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for block in range(3):
                stride = 2 if block == 0 and index > 1 else 1
                blocks.append(_BasicBlockA(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _fetch_resnet20a() -> str:
    return _download_to_cache(RESNET20A_URL, hash_prefix=RESNET20A_SHA256_PREFIX)


@register_model("resnet20a_cifar10", "cifar10", 10, 32, _fetch_resnet20a)
def resnet20a_cifar10() -> nn.Module:
    return ResNet20A(num_classes=10)


# ---------------------------------------------------------------------------------------------------
# Weights

def _download_to_cache(url: str, hash_prefix: str | None = None) -> str:
    """Download ``url`` once into the model cache and return the local path."""
    path = os.path.join(os.path.expanduser(MODEL_CACHE), os.path.basename(url.split("?")[0]))
    with fetching(path):
        if not os.path.exists(path):
            logger.info("downloading %s to %s", url, path)
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix)
    return path


def load_weights_file(model: nn.Module, path: str, network: str, ignored_keys: tuple[str, ...] = ()) -> None:
    """Load a state dict (plain, or under ``state_dict``, keys optionally prefixed ``module.``) strictly.

    Keys starting with one of ``ignored_keys`` are dropped first (auxiliary heads the model is built without).
    """
    if not os.path.isfile(path):
        raise UserError(f"teacher_weights file {path!r} does not exist; give an existing file, a URL, "
                        f"'' for the published weights or 'random'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged file
        raise UserError(f"teacher_weights file {path!r} cannot be read as a PyTorch checkpoint ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"teacher_weights file {path!r} does not hold a state dict")
    state = {key.removeprefix("module."): value for key, value in state.items()
             if not key.removeprefix("module.").startswith(ignored_keys)}
    own = model.state_dict()
    # load_state_dict raises on a shape mismatch even when not strict: leave those out and report them.
    mismatched = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    missing = [key for key in result.missing_keys if key not in mismatched]
    if missing or result.unexpected_keys or mismatched:
        raise UserError(
            f"teacher_weights file {path!r} does not fit network {network!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:3]}); is it for another architecture?")


def fetch_teacher_weights(network: str, teacher_weights: str = "") -> str | None:
    """The local file of the teacher's weights, downloaded first where it is not there yet (one process at a
    time, under a file lock: utils/locks.py); None for ``teacher_weights = "random"``. See :func:`build_teacher`."""
    if teacher_weights == "random":
        return None
    if teacher_weights == "":
        spec = get_model_spec(network)
        if spec.fetch_published is None:
            raise UserError(f"network {network!r} has no published weights: set teacher_weights to its "
                            f"weights file (a state dict)")
        try:
            return spec.fetch_published()
        except Exception as error:
            raise UserError(f"could not get the published weights of {network} ({error}); "
                            f"offline, set teacher_weights to a local file") from None
    if teacher_weights.startswith(("http://", "https://")):
        try:
            return _download_to_cache(teacher_weights)
        except Exception as error:
            raise UserError(f"could not download teacher_weights {teacher_weights!r} ({error})") from None
    return teacher_weights


def build_teacher(network: str, teacher_weights: str = "") -> tuple[nn.Module, str]:
    """Build the teacher in eval mode and load its weights; also return where they came from.

    ``teacher_weights``: ``""`` the published weights (downloaded on first use), a path or URL that
    file, ``"random"`` random initialisation (tests only).
    """
    spec = get_model_spec(network)
    model = spec.build()
    path = fetch_teacher_weights(network, teacher_weights)
    if path is None:
        logger.warning("teacher %s uses RANDOM weights (teacher_weights=random): for tests only", network)
        source = "random"
    else:
        with torch.no_grad():
            load_weights_file(model, path, network, spec.ignored_keys)
        source = os.path.abspath(path)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, source


def example_image(channels: int, image_size: int, device: torch.device | None = None) -> torch.Tensor:
    """One fixed random image (1 x ``channels`` x ``image_size``^2) for start-up checks. It comes from its own
    generator, so a check leaves the global random stream, and so the run, as it was."""
    return torch.randn(1, channels, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)


def check_teacher(model: nn.Module, network: str, num_classes: int, image_size: int, channels: int = 3) -> None:
    """Raise UserError unless ``model`` has a BatchNorm layer and maps a ``channels`` x ``image_size``^2 image
    to ``num_classes`` logits: what training needs of a teacher, checked before a run starts."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError(f"network {network!r} has no BatchNorm layer: the BN-statistics loss of the generator "
                        f"needs the running statistics of at least one; pick a model with BatchNorm")
    image = example_image(channels, image_size, next(model.parameters(), torch.empty(0)).device)
    try:
        with torch.no_grad():
            logits = model.eval()(image)
    except Exception as error:  # any layer of any model may reject the size
        raise UserError(f"network {network!r} cannot run on {image_size}x{image_size} images "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"set img_size to the input size it was built for") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"network {network!r} returns {shape} for one {image_size}x{image_size} image where "
                        f"nClasses = {num_classes} asks for logits of shape (1, {num_classes})")
