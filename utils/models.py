"""Model registry: teachers by name, with their dataset, class count and pretrained weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

__all__ = ["ModelSpec", "build_teacher", "get_model_spec", "load_weights_file", "model_names", "register_model"]

logger = logging.getLogger(__name__)

MODEL_CACHE = os.path.join("~", ".torch", "models")  # pytorchcv's default store


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dataset: str
    num_classes: int
    image_size: int
    build: Callable[[], nn.Module]  # random initialisation
    fetch_published: Callable[[], str]  # downloads (or finds) the published weights, returns the file path


_REGISTRY: dict[str, ModelSpec] = {}


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
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown network {name!r}; known networks: {', '.join(model_names())}") from None


# ---------------------------------------------------------------------------------------------------
# pytorchcv models: built by the package, published weights from its model store.

def _pytorchcv_fetch(name: str) -> Callable[[], str]:
    def fetch() -> str:
        from pytorchcv.models.common.model_store import get_model_file

        return get_model_file(name, local_model_store_dir_path=MODEL_CACHE)

    return fetch


def _register_pytorchcv(name: str, dataset: str, num_classes: int, image_size: int) -> None:
    def build() -> nn.Module:
        from pytorchcv.model_provider import get_model

        return get_model(name, pretrained=False)

    register_model(name, dataset, num_classes, image_size, _pytorchcv_fetch(name))(build)


_register_pytorchcv("resnet20_cifar10", "cifar10", 10, 32)
_register_pytorchcv("resnet20_cifar100", "cifar100", 100, 32)
_register_pytorchcv("resnet18", "imagenet", 1000, 224)
_register_pytorchcv("resnet50", "imagenet", 1000, 224)
_register_pytorchcv("mobilenetv2_w1", "imagenet", 1000, 224)


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
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        logger.info("downloading %s to %s", url, path)
        torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix)
    return path


def load_weights_file(model: nn.Module, path: str, network: str) -> None:
    """Load a state dict (plain, or under ``state_dict``, keys optionally prefixed ``module.``) strictly."""
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
    state = {key.removeprefix("module."): value for key, value in state.items()}
    result = model.load_state_dict(state, strict=False)
    mismatched = [key for key, value in state.items()
                  if key in model.state_dict() and model.state_dict()[key].shape != value.shape]
    if result.missing_keys or result.unexpected_keys or mismatched:
        raise UserError(
            f"teacher_weights file {path!r} does not fit network {network!r}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}); "
            f"is it for another architecture?")


def build_teacher(network: str, teacher_weights: str = "") -> tuple[nn.Module, str]:
    """Build the teacher in eval mode and load its weights; also return where they came from.

    ``teacher_weights``: ``""`` the published weights (downloaded on first use), a path or URL that
    file, ``"random"`` random initialisation (tests only).
    """
    spec = get_model_spec(network)
    model = spec.build()
    if teacher_weights == "random":
        logger.warning("teacher %s uses RANDOM weights (teacher_weights=random): for tests only", network)
        source = "random"
    else:
        if teacher_weights == "":
            try:
                path = spec.fetch_published()
            except Exception as error:
                raise UserError(f"could not get the published weights of {network} ({error}); "
                                f"offline, set teacher_weights to a local file") from None
        elif teacher_weights.startswith(("http://", "https://")):
            try:
                path = _download_to_cache(teacher_weights)
            except Exception as error:
                raise UserError(f"could not download teacher_weights {teacher_weights!r} ({error})") from None
        else:
            path = teacher_weights
        with torch.no_grad():
            load_weights_file(model, path, network)
        source = os.path.abspath(path)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, source
