"""Test sets for evaluation. Training never reads real data: the student only sees generated images."""

import dataclasses
import logging
import math
import os

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from ..models import IMAGENET_CROP_RATIO, EvalTransform, get_model_spec
from ..system import distributed
from ..system.errors import UserError
from .eval_cache import CachedLoader, cached_test_loader
from .images import read_image
from .workers import WorkerLoader, evaluation_workers

__all__ = ["NORMALIZATION", "build_test_loader", "eval_transform", "find_image_folder", "normalization"]

logger = logging.getLogger(__name__)

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS
# Batches each evaluation worker keeps ready. More would hold another 120 MB per worker at ImageNet's
# test_batch_size = 200 while the GPU only waits when decoding as a whole falls behind.
PREFETCH_BATCHES = 2


def eval_transform(options) -> EvalTransform:
    """How test images are prepared: the network's own preparation where it has one (torchvision's weights,
    pytorchcv's ImageNet table), else the dataset's (ImageNet: shorter side to img_size / 0.875, centre crop
    of img_size; CIFAR: as stored); ``norm_mean`` / ``norm_std`` replace the normalisation where set."""
    preset = get_model_spec(options.network).eval_transform
    if preset is None:
        size = options.img_size
        resize, crop = (math.ceil(size / IMAGENET_CROP_RATIO), size) if options.dataset == "imagenet" else (None, None)
        preset = EvalTransform(resize, crop, *NORMALIZATION[options.dataset])
    return dataclasses.replace(preset, mean=tuple(options.norm_mean) or preset.mean,
                               std=tuple(options.norm_std) or preset.std)


def normalization(options) -> tuple[tuple, tuple]:
    """(mean, std) of the test images: ``norm_mean`` / ``norm_std`` where set, else the network's or dataset's."""
    preset = eval_transform(options)
    return preset.mean, preset.std


def _has_class_folders(root: str) -> bool:
    for entry in os.scandir(root):
        if entry.is_dir():
            for item in os.scandir(entry.path):
                if item.is_file() and item.name.lower().endswith(IMAGE_EXTENSIONS):
                    return True
    return False


def find_image_folder(data_path: str) -> str | None:
    """The ImageFolder root under ``data_path`` (itself, or its ``val``/``test`` folder), or None."""
    for candidate in (data_path, os.path.join(data_path, "val"), os.path.join(data_path, "test")):
        if os.path.isdir(candidate) and _has_class_folders(candidate):
            return candidate
    return None


def _resize_and_crop(preset: EvalTransform) -> list:
    """The PIL steps of the test transform, before ``ToTensor``: what the evaluation cache stores."""
    steps = []
    if preset.resize is not None:
        steps.append(transforms.Resize(preset.resize, transforms.InterpolationMode(preset.interpolation)))
    if preset.crop is not None:
        steps.append(transforms.CenterCrop(preset.crop))
    return steps


def _transform(preset: EvalTransform):
    return transforms.Compose(_resize_and_crop(preset) + [transforms.ToTensor(),
                                                          transforms.Normalize(preset.mean, preset.std)])


def _torchvision_cifar(options, transform):
    cifar = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[options.dataset]
    try:
        # torchvision writes and extracts its archive in place: one process at a time, rank 0 first.
        from ..system.locks import fetching

        with fetching(os.path.join(options.dataPath, cifar.base_folder)):
            return cifar(root=options.dataPath, train=False, transform=transform, download=True)
    except Exception as error:  # network or archive errors; torchvision raises several types
        raise UserError(
            f"dataPath = {options.dataPath!r}: no ImageFolder there and {options.dataset} could not be "
            f"downloaded into it ({error}). Offline, point dataPath to an ImageFolder root of the test set") from None


def build_test_loader(options, device: torch.device | None = None) -> DataLoader | CachedLoader:
    """Evaluation loader: an ImageFolder root when ``dataPath`` holds one, else torchvision's CIFAR.

    Unless ``eval_cache = off`` (or the cache cannot be written), the images are decoded once into the
    evaluation cache and the loader yields batches normalised on ``device`` (default: the CPU), equal to the
    decoding loader's (:mod:`utils.data.eval_cache`). Otherwise the images are decoded at every evaluation.
    With workers (``nThreads`` > 0, at most one per CPU) they stay alive from one evaluation to the next and
    each keeps ``PREFETCH_BATCHES`` batches ready; batches come in pinned memory when ``device`` is CUDA
    (default: CUDA where available), so that copying them to the GPU does not block.
    """
    if not options.dataPath:
        raise UserError("dataPath is empty: set it to an ImageFolder root of the test set, or (CIFAR) to a "
                        "folder where torchvision may download the test set")
    preset = eval_transform(options)
    transform = _transform(preset)
    root = find_image_folder(options.dataPath)
    if root is not None:
        # The class index is the position of the folder name in sorted order, so a subset of the test set
        # must keep every class folder; folders without images are allowed for that.
        dataset = datasets.ImageFolder(root, transform, loader=read_image, allow_empty=True)
        found = len(dataset.classes)
        if found != options.nClasses:
            raise UserError(f"dataPath = {root!r} has {found} class folders but nClasses = {options.nClasses}; "
                            f"point dataPath to the {options.dataset} test/validation set")
        empty = found - len(set(dataset.targets))
        if empty:
            logger.warning("%d of the %d class folders in %s hold no images: accuracy is measured on the other "
                           "classes only", empty, found, root)
    elif options.dataset == "imagenet":
        state = "does not exist" if not os.path.exists(options.dataPath) else "holds no class folders of images"
        raise UserError(f"dataPath = {options.dataPath!r} {state}: point it to an ImageNet validation "
                        f"ImageFolder (val/<wnid>/*.JPEG) or its parent")
    else:
        dataset = _torchvision_cifar(options, transform)
    logger.info("test set: %d images from %s", len(dataset), root or options.dataPath)
    if distributed.world_size() > 1:
        # Each rank evaluates a disjoint share; evaluate() sums the counts over ranks.
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    cached = cached_test_loader(options, dataset, preset, _resize_and_crop(preset), device)
    if cached is not None:
        return cached
    workers = evaluation_workers(options.nThreads)
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    # A run evaluates after every epoch: starting the workers (and their imports) again each time would
    # cost seconds per evaluation on ImageNet.
    with_workers = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES} if workers else {}
    # Its workers ignore stop signals and draw their seeds from the loader's own generator (utils/data/workers.py).
    return WorkerLoader(dataset, batch_size=options.test_batch_size, shuffle=False, num_workers=workers,
                        pin_memory=on_cuda, **with_workers)


