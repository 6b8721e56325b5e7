"""Export of a trained student out of PyTorch: its quantized weights as integer codes bit-packed into a
safetensors file (:mod:`.codes`, :mod:`.packed`, with :func:`load_packed` to rebuild the student), the student
as an ONNX model that onnxruntime runs (:mod:`.onnx_modules`, :mod:`.onnx_export`), their evaluation on the
run's test set (:mod:`.runtime`). ``tools/export.py``'s command line, which reads the run's config, is
:mod:`utils.runs.export_cli`. This package imports ``quantization_utils`` and the packages below it (``system``,
``models``, ``data``, ``training``), never ``runs`` or ``sweeps``; ``onnx``, ``onnxruntime``, ``onnxscript`` and
``safetensors`` are imported only where a file of theirs is written or read.
"""

from .codes import pack_bits, quantize_weight, unpack_bits
from .onnx_export import export_onnx
from .packed import load_packed, save_packed
from .runtime import evaluate_exported, exported_options

__all__ = ["evaluate_exported", "export_onnx", "exported_options", "load_packed", "pack_bits", "quantize_weight",
           "save_packed", "unpack_bits"]
