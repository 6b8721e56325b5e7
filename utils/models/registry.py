"""The model registry: network names to their builders, dataset, class count, input size and weights.

Four kinds of name resolve here: models registered with :func:`register_model` (:mod:`.resnet_a`), pytorchcv
classification models, ``torchvision:NAME`` and a user's ``MODULE:FUNCTION``. Published weights download once
into :data:`MODEL_CACHE` (:func:`download_to_cache`).
"""

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

from quantization_utils.registry import Registry

from ..system.errors import UserError
from ..system.locks import fetching

__all__ = ["EvalTransform", "IMAGENET_CROP_RATIO", "MODELS", "MODEL_CACHE", "ModelSpec", "download_to_cache",
           "get_model_spec", "model_names", "register_model"]

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
    eval_transform: EvalTransform | None = None  # None: the dataset's (utils/data/loaders.py)
    ignored_keys: tuple[str, ...] = ()  # prefixes of weight-file keys the built model lacks (auxiliary heads)


# name -> the ModelSpec of a builder registered with register_model
MODELS = Registry("model", docstring="what it builds and where it comes from")
TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_CROP_RATIO = 0.875  # 224 / 256: the crop's share of the resized shorter side


def register_model(name: str, dataset: str, num_classes: int, image_size: int,
                   fetch_published: Callable[[], str]):
    """Decorator registering a zero-argument builder under ``name``; its docstring must say what it builds."""
    return MODELS.register(name, lambda build: ModelSpec(name, dataset, num_classes, image_size, build,
                                                         fetch_published))


def model_names() -> list[str]:
    """The models registered here by name; pytorchcv, torchvision and user models are resolved on demand."""
    return sorted(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name``: a registered model, a pytorchcv classification model (``resnet56_cifar100``),
    ``torchvision:NAME`` (``torchvision:resnet18``) or ``MODULE:FUNCTION`` (a user's function that returns
    an ``nn.Module``). Nothing is built; a user's module is imported. Raises UserError for an unknown name."""
    if name in MODELS:
        return MODELS[name]
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



def download_to_cache(url: str, hash_prefix: str | None = None) -> str:
    """Download ``url`` once into the model cache and return the local path."""
    path = os.path.join(os.path.expanduser(MODEL_CACHE), os.path.basename(url.split("?")[0]))
    with fetching(path):
        if not os.path.exists(path):
            logger.info("downloading %s to %s", url, path)
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix)
    return path
