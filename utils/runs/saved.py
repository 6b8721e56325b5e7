"""Saved runs: their options with ``--set`` overrides, and evaluating a saved student without the trainer
(``main.py --eval FILE_OR_RUN_DIR``)."""

from __future__ import annotations

import logging
import typing

import torch
import torch.nn as nn

from quantization_utils import quant_path

from ..data.loaders import build_test_loader
from ..data.workers import close_workers
from ..export.common import build_student
from ..export.runtime import evaluate_exported, evaluation_summary, exported_options
from ..system.devices import configure_backends, cuda_device
from ..system.errors import ConfigError
from ..training.checkpoints import find_student_file, load_run_file
from ..training.evaluate import evaluate
from .config import Options, options_from_dict, parse_override

__all__ = ["EVAL_KEYS", "evaluate_saved", "load_quantized_model", "saved_options"]

logger = logging.getLogger("granq")

# What --set may change when a saved student is evaluated or exported: where and how the test set is read and
# the student computed, never the student itself.
EVAL_KEYS = ("dataPath", "test_batch_size", "nThreads", "eval_cache", "GPU", "deterministic", "quant_impl")


def saved_options(saved: dict, overrides: typing.Iterable[str] = (), allowed: typing.Collection[str] | None = None,
                  use: str = "") -> Options:
    """The options ``saved`` (a run's, as :meth:`Options.to_dict` wrote them) with the ``--set`` ``overrides``.

    Only keys of ``allowed`` (any key where None) may be overridden; another is a ConfigError saying that
    ``use`` (the command: ``--eval``, ``the exporter``) may change only those.
    """
    values = dict(saved)
    for text in overrides:
        key, value = parse_override(text)
        if allowed is not None and key not in allowed:
            raise ConfigError(f"--set {key}=...: {use} cannot change a saved student; it may change only "
                              f"{', '.join(allowed)}")
        values[key] = value
    return options_from_dict(values)


def load_quantized_model(path: str, map_location="cpu") -> nn.Module:
    """Rebuild the quantized student saved at ``path`` (a ``.pt`` file or a run directory), in eval mode.

    A run directory gives its last student (``checkpoint.pt``); pass ``best_student.pt`` for the best.
    The architecture, bit-widths and quantizer modes come from the options saved in the file; the model's
    tensors are on ``map_location``.
    """
    file = find_student_file(path)
    record = load_run_file(file, map_location)
    return build_student(record["options"], record["student"], file)


def evaluate_saved(path: str, data_path: str | None = None, overrides: typing.Iterable[str] = (),
                   device: torch.device | str | None = None) -> dict:
    """Top-1/top-5 of the student saved at ``path`` (a run directory, a ``.pt`` file, or a ``student.onnx`` or
    ``student.safetensors`` of tools/export.py: :func:`utils.export.evaluate_exported`) on its test set.

    A run directory gives its last student (``checkpoint.pt``), so on the same kind of device the result
    equals the run's recorded ``student_top1``; pass ``.../best_student.pt`` for ``best_top1``.
    ``data_path`` replaces the recorded ``dataPath`` (a relative one is read from the current
    directory); ``overrides`` are ``key=value`` strings like ``--set``, of :data:`EVAL_KEYS`.
    ``device`` defaults to GPU ``GPU`` (the saved value, or ``--set GPU=N``) when CUDA is available, else the
    CPU. The backend flags are set as the run's ``deterministic`` sets them (``--set deterministic=...``
    changes that), so that a run made with ``deterministic = true`` is repeated exactly on CUDA too.

    Returns student_top1/5, the accuracy recorded in the file (``recorded_top1``), the network and the
    student's spec, the file's ``epoch`` field as written (``checkpoint.pt``: epochs finished), the checkpoint
    path and seed (:func:`utils.export.runtime.evaluation_summary`).
    """
    data = {} if data_path is None else {"dataPath": data_path}
    if str(path).endswith((".onnx", ".safetensors")):  # a file of tools/export.py: onnxruntime, load_packed
        options = saved_options({**exported_options(path), **data}, overrides, EVAL_KEYS, "--eval")
        return evaluate_exported(path, options, device)
    file = find_student_file(path)
    record = load_run_file(file)
    student = build_student(record["options"], record["student"], file)
    options = saved_options({**record["options"], **data}, overrides, EVAL_KEYS, "--eval")
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
    logger.info("saved student %s (%s W%dA%d %s/%s): top-1 %.2f%%, top-5 %.2f%% (recorded %s)", file,
                options.network, options.qw, options.qa, options.act_mode, options.weight_granularity, top1, top5,
                "none" if recorded is None else f"{recorded:.2f}%")
    return evaluation_summary(options, (top1, top5), recorded, {**record, "file": file}, device, backends,
                              quant_path(options.quant_impl))
