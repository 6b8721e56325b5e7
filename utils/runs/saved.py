"""Evaluating a saved student without the trainer: ``main.py --eval FILE_OR_RUN_DIR``."""

from __future__ import annotations

import logging
import os
import typing

import torch
import torch.nn as nn

from quantization_utils import STUDENT_KEYS, granq_path, rebuild_student

from ..data.loaders import build_test_loader
from ..data.workers import close_workers
from ..export.runtime import evaluate_exported, exported_options
from ..models import get_model_spec
from ..system.devices import configure_backends, cuda_device
from ..system.errors import UserError
from ..training.checkpoints import RunFileError, find_student_file, load_run_file
from ..training.evaluate import evaluate
from .config import options_from_dict, parse_override

__all__ = ["evaluate_saved", "load_quantized_model"]

logger = logging.getLogger("granq")

# Overriding these would evaluate a different model than the one saved.
FIXED_KEYS = ("network",) + STUDENT_KEYS + ("act_types", "dataset", "nClasses")


def _rebuild(record: dict, file: str) -> nn.Module:
    options = record["options"]
    if "network" not in options:
        raise RunFileError(f"{file!r}: the saved options name no network; cannot rebuild the student")
    # The float architecture comes from the registry: random initialisation, nothing downloaded.
    float_model = get_model_spec(options["network"]).build()
    try:
        return rebuild_student(float_model, options, record["student"])
    except ValueError as error:
        raise RunFileError(f"{file!r} ({options['network']}): {error}") from None


def load_quantized_model(path: str, map_location="cpu") -> nn.Module:
    """Rebuild the quantized student saved at ``path`` (a ``.pt`` file or a run directory), in eval mode.

    A run directory gives its last student (``checkpoint.pt``); pass ``best_student.pt`` for the best.
    The architecture, bit-widths and quantizer modes come from the options saved in the file; the model's
    tensors are on ``map_location``.
    """
    file = find_student_file(path)
    return _rebuild(load_run_file(file, map_location), file)


def _saved_options(saved: dict, data_path: str | None, overrides: typing.Iterable[str]):
    values = dict(saved)
    for text in overrides:
        key, value = parse_override(text)
        if key in FIXED_KEYS:
            raise UserError(f"--set {key}=... cannot change a saved student; {', '.join(FIXED_KEYS)} come from "
                            f"the checkpoint")
        values[key] = value
    if data_path is not None:
        values["dataPath"] = data_path
    return options_from_dict(values)


def evaluate_saved(path: str, data_path: str | None = None, overrides: typing.Iterable[str] = (),
                   device: torch.device | str | None = None) -> dict:
    """Top-1/top-5 of the student saved at ``path`` (a run directory, a ``.pt`` file, or a ``student.onnx`` or
    ``student.safetensors`` of tools/export.py: :func:`utils.export.evaluate_exported`) on its test set.

    A run directory gives its last student (``checkpoint.pt``), so on the same kind of device the result
    equals the run's recorded ``student_top1``; pass ``.../best_student.pt`` for ``best_top1``.
    ``data_path`` replaces the recorded ``dataPath`` (a relative one is read from the current
    directory); ``overrides`` are ``key=value`` strings like ``--set`` (``test_batch_size``, ``nThreads``).
    ``device`` defaults to GPU ``GPU`` (the saved value, or ``--set GPU=N``) when CUDA is available, else the
    CPU. The backend flags are set as the run's ``deterministic`` sets them (``--set deterministic=...``
    changes that), so that a run made with ``deterministic = true`` is repeated exactly on CUDA too.

    Returns student_top1/5, the accuracy recorded in the file (``recorded_top1``), the model keys, the
    file's ``epoch`` field as written (``checkpoint.pt``: epochs finished), the checkpoint path and seed.
    """
    if str(path).endswith((".onnx", ".safetensors")):  # a file of tools/export.py: onnxruntime, load_packed
        return evaluate_exported(path, _saved_options(exported_options(path), data_path, overrides), device)
    file = find_student_file(path)
    record = load_run_file(file)
    student = _rebuild(record, file)
    options = _saved_options(record["options"], data_path, overrides)
    if device is not None:
        device = torch.device(device)
    else:
        device = cuda_device(options.GPU, "GPU") if torch.cuda.is_available() else torch.device("cpu")
    backends = configure_backends(options.deterministic, device)
    loader = build_test_loader(options, device)
    # The default layout, as the trainer evaluates: the run's own accuracy is repeated bit for bit.
    try:
        top1, top5 = evaluate(student.to(device), loader, device)
    finally:
        close_workers(loader)
    # checkpoint.pt records its last evaluation as last_top1, best_student.pt its own as top1.
    recorded = record.get("last_top1", record.get("top1"))
    summary = {
        "student_top1": top1,
        "student_top5": top5,
        "recorded_top1": recorded,
        **{key: getattr(options, key) for key in ("network", "dataset") + STUDENT_KEYS},
        "epoch": record.get("epoch"),
        "checkpoint": os.path.abspath(file),
        "seed": record.get("meta", {}).get("seed"),
        "dataPath": options.dataPath,
        "device": str(device),
        **backends,
        "granq_path": granq_path(options.granq_impl),
    }
    logger.info("saved student %s (%s W%dA%d %s/%s): top-1 %.2f%%, top-5 %.2f%% (recorded %s)", file,
                options.network, options.qw, options.qa, options.act_mode, options.weight_granularity, top1, top5,
                "none" if recorded is None else f"{recorded:.2f}%")
    return summary
