"""Teachers: built from the registry, with their weights loaded and checked before a run starts."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from ..system.errors import UserError
from .registry import download_to_cache, get_model_spec

__all__ = ["build_teacher", "check_teacher", "example_image", "fetch_teacher_weights", "load_weights_file"]

logger = logging.getLogger(__name__)

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
    time, under a file lock: utils/system/locks.py);
    None for ``teacher_weights = "random"``. See :func:`build_teacher`."""
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
            return download_to_cache(teacher_weights)
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
