"""The student as an ONNX model: opset 21, dynamic batch size, integer weights, checked by ``onnx.checker``.

:func:`export_onnx` traces :func:`.onnx_modules.deploy_model` with ``torch.onnx.export`` (the torch.export
based exporter; its graph optimiser keeps ``QuantizeLinear`` and ``DequantizeLinear`` as they are), turns the
int8 codes and zero points of ``qw`` <= 4 into INT4 initializers, and writes what a runtime needs to know
into ``metadata_props`` (:func:`onnx_metadata`):

- ``normalize_mean``, ``normalize_std``: JSON lists, the normalisation the input must have;
- ``input_size``: the height and width of the input (int);
- the student's spec, network and dataset (:func:`.common.student_metadata`: ``qw``, ``qa``, ``act_mode``,
  ``weight_granularity``, ...), the run's;
- ``deploys_as`` (:func:`.onnx_modules.deployment`): ``QDQ`` for frozen activation ranges (``layerwise``,
  ``channel``), and for GranQ :data:`~.onnx_modules.GRANQ_DEPLOYMENT`: its ranges vary along the input channels
  a convolution sums over, so no integer convolution can take them, and the convolution runs on dequantized
  values;
- ``options`` (the run's options as JSON, from which ``--eval`` finds the test set) and ``source`` (JSON: the
  run file the student came from, its ``epoch``, the ``top1`` it records for the PyTorch student, ``meta``).
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.nn as nn

from ..data.loaders import eval_transform
from ..system.errors import UserError
from ..system.files import atomic_write_bytes
from .common import require, student_metadata
from .onnx_modules import TRANSLATIONS, deploy_model, deployment

__all__ = ["OPSET", "export_onnx", "input_size", "onnx_metadata"]

OPSET = 21
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1; the batch stays dynamic


def input_size(options) -> int:
    """The height and width of the images the student reads: the test transform's crop, else ``img_size``."""
    return eval_transform(options).crop or options.img_size


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _trace(deployed: nn.Module, options) -> "object":
    size = input_size(options)
    example = torch.randn(EXAMPLE_BATCH, options.channels, size, size, generator=torch.Generator().manual_seed(0))
    # The exporter reports its steps on stdout, whose last line belongs to the command's JSON.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        return torch.onnx.export(deployed, (example,), None, dynamo=True, opset_version=OPSET, optimize=True,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: torch.export.Dim("batch")},),
                                 custom_translation_table=TRANSLATIONS, verbose=False)


def _int4_initializers(model) -> int:
    """Turn the int8 codes and zero points of the weights' DequantizeLinear nodes (those whose input is an
    initializer and that have a zero point) into INT4; return how many nodes. An initializer that other nodes
    share is copied first."""
    import ml_dtypes  # onnx's own dependency for its 4-bit types
    from onnx import TensorProto, numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    # The remainders' DequantizeLinear nodes have no zero point and keep their type.
    weight_nodes = [node for node in model.graph.node if node.op_type == "DequantizeLinear" and len(node.input) == 3
                    and node.input[0] in initializers and initializers[node.input[0]].data_type == TensorProto.INT8]
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    converted: dict[str, str] = {}
    def fits(name: str) -> bool:
        values = numpy_helper.to_array(initializers[name])
        return values.size == 0 or (values.min() >= -8 and values.max() <= 7)

    # A layer whose codes do not fit INT4 (a row of 2**qw + 1 codes) keeps INT8.
    weight_nodes = [node for node in weight_nodes if fits(node.input[0]) and fits(node.input[2])]
    for node in weight_nodes:
        for index in (0, 2):
            name = node.input[index]
            if name in converted:
                node.input[index] = converted[name]
                continue
            values = numpy_helper.to_array(initializers[name])
            shared = readers[name] > sum(name in (n.input[0], n.input[2]) for n in weight_nodes)
            new_name = f"{name}_int4" if shared else name
            tensor = numpy_helper.from_array(values.astype(ml_dtypes.int4), new_name)  # packed, 2 per byte
            if not shared:
                model.graph.initializer.remove(initializers[name])
            model.graph.initializer.append(tensor)
            converted[name] = node.input[index] = new_name
    return len(weight_nodes)


def _strip_annotations(model) -> None:
    """Drop what the exporter records for debugging (each node's torch source, module path and FX node: more
    bytes than the weights) and the intermediate type annotations, which runtimes infer again."""
    for item in list(model.graph.node) + list(model.graph.input) + list(model.graph.output):
        del item.metadata_props[:]
    del model.graph.value_info[:]


def onnx_metadata(options, source: dict | None = None) -> dict[str, str]:
    """The ``metadata_props`` of the student of ``options`` (see the module docstring)."""
    preset = eval_transform(options)
    return {
        "normalize_mean": json.dumps(list(preset.mean)),
        "normalize_std": json.dumps(list(preset.std)),
        "input_size": str(input_size(options)),
        **student_metadata(options.student_spec(), options.network, options.dataset),
        "deploys_as": deployment(options.act_mode),
        "options": json.dumps(options.to_dict()),
        "source": json.dumps(source or {}),
    }


def export_onnx(student: nn.Module, options, path: str, source: dict | None = None) -> int:
    """Write the ONNX model of the fake-quantized ``student`` (the run's ``options``, an ``Options``) to ``path``
    atomically, after ``onnx.checker``; return its size in bytes. UserError for what the exporter cannot express."""
    onnx = require("onnx")
    require("onnxscript")  # torch.onnx.export's exporter
    deployed = deploy_model(student)
    try:
        model = _trace(deployed, options).model_proto
    except Exception as error:  # torch.export and the ONNX translation raise many types
        raise UserError(f"network {options.network!r}: the ONNX exporter cannot express this student "
                        f"({_first_line(error)})") from None
    _strip_annotations(model)
    if options.qw <= 4:
        _int4_initializers(model)
    metadata = onnx_metadata(options, source)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "granq tools/export.py"
    model.doc_string = (f"GranQ student {options.network} W{options.qw}A{options.qa} {options.act_mode}/"
                        f"{options.weight_granularity}; deploys as {metadata['deploys_as']}")
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    atomic_write_bytes(data, path)
    return len(data)
