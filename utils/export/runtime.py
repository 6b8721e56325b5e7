"""Running the exported files: onnxruntime on the CPU, the packed student in PyTorch, on the run's test set.

:func:`evaluate_exported` is what ``main.py --eval student.onnx`` and ``--eval student.safetensors`` call
(through :func:`utils.runs.saved.evaluate_saved`, which resolves the options and ``--set`` overrides);
:func:`compare_on_test_set` runs the PyTorch student and the ONNX model on the same batches, for
``tools/export.py``.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn as nn

from quantization_utils import quant_path

from ..data.loaders import build_test_loader
from ..data.workers import close_workers
from ..system.devices import configure_backends, cuda_device
from ..system.errors import UserError
from ..training.checkpoints import RunFileError
from ..training.evaluate import evaluate
from .common import require
from .packed import load_packed, packed_options, packed_source, read_packed

__all__ = ["EXPORTED_SUFFIXES", "compare_on_test_set", "evaluate_exported", "evaluation_summary", "exported_options",
           "onnx_logits", "onnx_session", "read_onnx_metadata"]

logger = logging.getLogger("granq")
EXPORTED_SUFFIXES = (".onnx", ".safetensors")


def onnx_session(path: str, threads: int | None = None):
    """An onnxruntime session of the model at ``path`` on the CPU provider, with ``threads`` intra-op threads
    (default: torch's thread count)."""
    ort = require("onnxruntime")
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads or torch.get_num_threads()
    settings.inter_op_num_threads = 1
    settings.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(path, settings, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types for files it cannot load
        raise RunFileError(f"{path!r} cannot be loaded by onnxruntime ({str(error).strip().splitlines()[0]})") from None


def onnx_logits(session, images: torch.Tensor) -> torch.Tensor:
    """The model's output for a batch of normalised images."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: images.detach().cpu().numpy()})[0])


def read_onnx_metadata(path: str) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX model at ``path``; RunFileError if it is not a student's."""
    onnx = require("onnx")
    if not os.path.isfile(path):
        raise RunFileError(f"{path!r} does not exist; give a student.onnx written by tools/export.py")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError and others
        raise RunFileError(f"{path!r} cannot be read as an ONNX model ({error})") from None
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if "options" not in metadata or "act_mode" not in metadata:
        raise RunFileError(f"{path!r} is not a student exported by tools/export.py (its metadata_props lack the "
                           f"run's options)")
    return metadata


def exported_options(path: str) -> dict:
    """The run's options saved in an exported file (``.onnx`` or ``.safetensors``)."""
    if path.endswith(".onnx"):
        return json.loads(read_onnx_metadata(path)["options"])
    return packed_options(read_packed(path)[1])


def _source(path: str) -> dict:
    if path.endswith(".onnx"):
        return json.loads(read_onnx_metadata(path).get("source", "{}"))
    return packed_source(read_packed(path)[1])


@torch.no_grad()
def _onnx_accuracy(session, loader) -> tuple[float, float]:
    hits, total = torch.zeros(2, dtype=torch.long), 0
    for images, labels in loader:
        logits = onnx_logits(session, images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.cpu()[:, None]
        hits += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
        total += labels.shape[0]
    if total == 0:
        raise UserError("the test set is empty")
    return 100.0 * hits[0].item() / total, 100.0 * hits[1].item() / total


def evaluation_summary(options, accuracy: tuple[float, float], recorded_top1: float | None, source: dict, device,
                       backends: dict, path_taken: str) -> dict:
    """What ``--eval`` gives of a student of ``options``: its top-1 and top-5 (``accuracy``) beside the top-1 its
    file records, the network, the student's spec (:meth:`~quantization_utils.StudentSpec.to_dict`), the file's
    ``epoch`` and seed (``source``: the run file's record or an exported file's source, with ``file``, the file
    evaluated), the test set, the device, its backend flags and which quantizers ran (``path_taken``, recorded as
    ``quant_path``)."""
    return {
        "student_top1": accuracy[0],
        "student_top5": accuracy[1],
        "recorded_top1": recorded_top1,
        "network": options.network,
        "dataset": options.dataset,
        **options.student_spec().to_dict(),
        "epoch": source.get("epoch"),
        "checkpoint": os.path.abspath(source["file"]),
        "seed": source.get("meta", {}).get("seed"),
        "dataPath": options.dataPath,
        "device": str(device),
        **backends,
        "quant_path": path_taken,
    }


def evaluate_exported(path: str, options, device: torch.device | str | None = None) -> dict:
    """Top-1/top-5 of an exported student on the test set of ``options`` (the file's options, with overrides).

    ``.onnx``: onnxruntime on the CPU. ``.safetensors``: :func:`.packed.load_packed` in PyTorch, on ``device``
    (default: GPU ``GPU`` where CUDA is available, else the CPU), as ``--eval`` of a run. The summary has the
    keys of :func:`evaluation_summary`, ``recorded_top1`` being the top-1 the run file recorded for the PyTorch
    student, and ``runtime``.
    """
    if not path.endswith(EXPORTED_SUFFIXES):
        raise UserError(f"{path!r} is not an exported student ({', '.join(EXPORTED_SUFFIXES)})")
    source = _source(path)
    if path.endswith(".onnx"):
        model, device = onnx_session(path), torch.device("cpu")
        backends = configure_backends(options.deterministic, device)
        runtime, impl = f"onnxruntime {require('onnxruntime').__version__} (CPUExecutionProvider)", "onnxruntime"
    else:
        model = load_packed(path)
        if device is not None:
            device = torch.device(device)
        else:
            device = cuda_device(options.GPU, "GPU") if torch.cuda.is_available() else torch.device("cpu")
        backends = configure_backends(options.deterministic, device)
        runtime, impl = f"torch {torch.__version__}", None
    loader = build_test_loader(options, device)
    try:
        top1, top5 = _onnx_accuracy(model, loader) if impl else evaluate(model.to(device), loader, device)
    finally:
        close_workers(loader)
    summary = evaluation_summary(options, (top1, top5), source.get("top1"), {**source, "file": path}, device,
                                 backends, impl or quant_path(options.quant_impl))
    logger.info("exported student %s (%s W%dA%d %s/%s, %s): top-1 %.2f%%, top-5 %.2f%%", path, options.network,
                options.qw, options.qa, options.act_mode, options.weight_granularity, runtime, top1, top5)
    return {**summary, "runtime": runtime}


@torch.no_grad()
def compare_on_test_set(student: nn.Module, session, loader, recorded_top1: float | None = None,
                        compared_images: int = 1000) -> dict:
    """The onnxruntime ``session``'s top-1 over ``loader`` beside the PyTorch ``student``'s, and the differences
    of their logits: the largest, its median over the images (each image's largest) and on how many images
    their top-1 differ.

    ``recorded_top1``: the PyTorch student's top-1 on this test set as its run recorded it on the CPU, which
    evaluating it again repeats exactly; the student then runs only on the first ``compared_images`` images,
    for the logits. Without it the student runs on every image and its top-1 is measured.

    The two differ in the last bits (ONNX multiplies by ``1 / scale``, and the runtimes add in other orders);
    where that moves a value across a rounding boundary of a quantizer, the code moves by one step, and with
    GranQ so can a (sample, channel) range: the differences are float rounding on most images, larger on a few.
    """
    student = student.eval()
    hits, disagreements, total, compared, per_image = torch.zeros(2, dtype=torch.long), 0, 0, 0, []
    for images, labels in loader:
        images, labels = images.cpu(), labels.cpu()
        exported = onnx_logits(session, images)
        hits[1] += (exported.argmax(1) == labels).sum()
        if recorded_top1 is None or compared < compared_images:
            reference = student(images)
            hits[0] += (reference.argmax(1) == labels).sum()
            disagreements += (reference.argmax(1) != exported.argmax(1)).sum().item()
            per_image.append((reference - exported).abs().amax(1))
            compared += labels.shape[0]
        total += labels.shape[0]
    if total == 0:
        raise UserError("the test set is empty")
    differences = torch.cat(per_image)
    torch_top1 = 100.0 * hits[0].item() / total if recorded_top1 is None else recorded_top1
    return {"torch_top1": torch_top1, "torch_top1_from": "measured" if recorded_top1 is None else "recorded",
            "onnxruntime_top1": 100.0 * hits[1].item() / total, "test_images": total,
            "max_logit_difference": differences.max().item(), "median_logit_difference": differences.median().item(),
            "top1_disagreements": disagreements, "compared_images": compared}
