"""Evaluate a saved student on the test set without training: the run's options come from the file."""

from __future__ import annotations

import logging
import os
import typing

import torch

from quantization_utils.checkpoint import MODEL_KEYS, CheckpointError, read_student_checkpoint, rebuild_student

from .config import options_from_dict, parse_override
from .data import build_test_loader
from .errors import UserError
from .trainer import evaluate

__all__ = ["evaluate_saved"]

logger = logging.getLogger("granq")

# Overriding these would evaluate a different model than the one saved.
FIXED_KEYS = MODEL_KEYS + ("dataset", "nClasses")


def _saved_options(checkpoint: dict, data_path: str | None, overrides: typing.Iterable[str]):
    values = dict(checkpoint["options"])
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
    """Top-1/top-5 of the student saved at ``path`` (a run directory or a ``.pt`` file) on its test set.

    A run directory gives its last student (``checkpoint.pt``), so on the same kind of device the result
    equals the run's recorded ``student_top1``; pass ``.../best_student.pt`` for ``best_top1``.
    ``data_path`` replaces the recorded ``dataPath`` (a relative one is read from the current
    directory); ``overrides`` are ``key=value`` strings like ``--set`` (``test_batch_size``, ``nThreads``).
    ``device`` defaults to CUDA when available, else the CPU.

    Returns student_top1/5, the accuracy recorded in the file (``recorded_top1``), the model keys, the
    file's ``epoch`` field as written (``checkpoint.pt``: epochs finished), the checkpoint path and seed.
    """
    try:
        file, checkpoint = read_student_checkpoint(path)
        student = rebuild_student(checkpoint)
    except CheckpointError as error:
        raise UserError(str(error)) from None
    options = _saved_options(checkpoint, data_path, overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = build_test_loader(options)
    # The default layout, as the trainer evaluates: the run's own accuracy is repeated bit for bit.
    top1, top5 = evaluate(student.to(device), loader, device)
    # checkpoint.pt records its last evaluation as last_top1, best_student.pt its own as top1.
    recorded = checkpoint.get("last_top1", checkpoint.get("top1"))
    summary = {
        "student_top1": top1,
        "student_top5": top5,
        "recorded_top1": recorded,
        "network": options.network,
        "dataset": options.dataset,
        "qw": options.qw,
        "qa": options.qa,
        "act_mode": options.act_mode,
        "weight_granularity": options.weight_granularity,
        "epoch": checkpoint.get("epoch"),
        "checkpoint": os.path.abspath(file),
        "seed": checkpoint.get("meta", {}).get("seed"),
        "dataPath": options.dataPath,
        "device": str(device),
    }
    logger.info("saved student %s (%s W%dA%d %s/%s): top-1 %.2f%%, top-5 %.2f%% (recorded %s)", file,
                options.network, options.qw, options.qa, options.act_mode, options.weight_granularity, top1, top5,
                "none" if recorded is None else f"{recorded:.2f}%")
    return summary
