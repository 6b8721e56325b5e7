"""The packed student: integer weights bit-packed into a safetensors file, and :func:`load_packed`.

The quantized layers (QuantConv2d, QuantLinear) share three tensors, each layer's part starting at a byte
(``layers`` gives where):

- ``quantized.codes``: uint8, the codes ``q + 2**(qw-1)`` (``q`` of :mod:`.codes`) packed at ``qw`` bits;
- ``quantized.scales``: float32, one scale per row (per (out, in) kernel or per output channel, as the run);
- ``quantized.zero_points``: uint8, the zero points ``z`` as ``z - zero_point_min``, packed at
  ``zero_point_bits`` bits (``qw`` bits where every range holds 0; more where a kernel's values are all of
  one sign, whose grid then lies away from 0).

Every other entry of the student's state dict (BatchNorm, biases, layers left in float, tracked activation
ranges) is stored as it is, under its own name. The metadata holds ``format``, the run's ``options`` (JSON), the
student's spec, network and dataset (:func:`.common.student_metadata`: ``qw``, ``qa``, ``act_mode``,
``weight_granularity``, ...), ``source`` (JSON: the run file it came from, its ``epoch``, ``top1`` and
``meta``) and ``layers``: per quantized layer,
in the order of its parts, its weight's ``shape``, ``bits``, ``rows`` (ranges), ``zero_point_min``,
``zero_point_bits`` and, where there are any, ``overflow``: the [flat index, code] of the rare codes beyond
the ``qw``-bit range (:mod:`.codes`), stored clamped in ``codes``. A layer's parts take ``ceil(numel * bits /
8)`` bytes of codes, ``rows`` scales and ``ceil(rows * zero_point_bits / 8)`` bytes of zero points. Sharing
three tensors keeps the file's header small: with three tensors per layer a ResNet-20's would take another
0.6 % of its float size.

:func:`load_packed` rebuilds the fake-quantized student; its weights are the quantized values
``(q - z) / scale``, which it uses as they are, so its logits equal the saved student's bit for bit. The
trained float weights themselves are not stored: the packed student is for inference, not to train on.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn

from quantization_utils import StudentSpec

from ..system.files import atomic_write_bytes
from ..training.checkpoints import RunFileError
from .codes import (
    QuantizedWeight,
    bits_for,
    dequantize,
    pack_bits,
    packed_bytes,
    quantize_weight,
    quantized_layers,
    unpack_bits,
)
from .common import build_student, require, student_metadata

__all__ = ["PACKED_FORMAT", "load_packed", "pack_student", "packed_options", "packed_source", "read_packed",
           "save_packed", "weights_on_grid"]

PACKED_FORMAT = "granq-packed-1"
PARTS = ("codes", "scales", "zero_points")
PART_DTYPES = {"codes": torch.uint8, "scales": torch.float32, "zero_points": torch.uint8}


def pack_student(student: nn.Module, options: dict, source: dict | None = None) -> tuple[dict, dict]:
    """The tensors and metadata of the packed file of ``student`` (see the module docstring)."""
    layers = quantized_layers(student)
    parts: dict[str, list[torch.Tensor]] = {part: [] for part in PARTS}
    table = {}
    for name, layer in layers.items():
        weight = quantize_weight(layer)
        low, high = int(weight.zero_point.min()), int(weight.zero_point.max())
        zero_bits = bits_for(low, high)
        overflow = weight.overflow  # rare codes one step beyond the range: stored clamped, listed exactly
        clamped = weight.codes.clamp(-(2 ** (weight.bits - 1)), 2 ** (weight.bits - 1) - 1)
        pieces = {"codes": pack_bits(clamped + 2 ** (weight.bits - 1), weight.bits),
                  "scales": weight.scale.clone(),
                  "zero_points": pack_bits(weight.zero_point - low, zero_bits)}
        for part, piece in pieces.items():
            parts[part].append(piece)
        table[name] = {"shape": list(weight.shape), "bits": weight.bits, "rows": weight.rows,
                       "zero_point_min": low, "zero_point_bits": zero_bits}
        if overflow:
            table[name]["overflow"] = overflow
    tensors = {f"quantized.{part}": torch.cat(pieces) if pieces else torch.zeros(0, dtype=PART_DTYPES[part])
               for part, pieces in parts.items()}
    quantized = {f"{name}.weight" for name in layers}
    for key, value in student.state_dict().items():
        if key not in quantized:
            tensors[key] = value.detach().cpu().contiguous().clone()
    compact = {"separators": (",", ":")}
    metadata = {"format": PACKED_FORMAT, "options": json.dumps(options, **compact),
                "source": json.dumps(source or {}, **compact), "layers": json.dumps(table, **compact)}
    metadata.update(student_metadata(StudentSpec.from_dict(options), options.get("network"), options.get("dataset")))
    return tensors, metadata


def save_packed(student: nn.Module, path: str, options: dict, source: dict | None = None) -> int:
    """Write the packed file of ``student`` to ``path`` atomically; return its size in bytes."""
    safetensors_torch = require("safetensors.torch")
    data = safetensors_torch.save(*pack_student(student, options, source))
    atomic_write_bytes(data, path)
    return len(data)


def read_packed(path: str) -> tuple[dict, dict]:
    """The tensors and metadata of the packed file at ``path``; RunFileError if it is not one."""
    safetensors = require("safetensors")
    if not os.path.isfile(path):
        raise RunFileError(f"{path!r} does not exist; give a student.safetensors written by tools/export.py")
    try:
        with safetensors.safe_open(path, framework="pt") as opened:
            metadata = opened.metadata() or {}
            tensors = {key: opened.get_tensor(key) for key in opened.keys()}
    except Exception as error:  # safetensors raises its own error types for a damaged or foreign file
        raise RunFileError(f"{path!r} cannot be read as a safetensors file ({error})") from None
    if metadata.get("format") != PACKED_FORMAT:
        raise RunFileError(f"{path!r} is not a packed student of this project (its metadata has format "
                           f"{metadata.get('format')!r}, not {PACKED_FORMAT!r})")
    return tensors, metadata


def packed_options(metadata: dict) -> dict:
    """The run's options saved in a packed file's metadata."""
    return json.loads(metadata["options"])


def packed_source(metadata: dict) -> dict:
    """Where a packed file came from (see the module docstring)."""
    return json.loads(metadata.get("source", "{}"))


def weights_on_grid(weight: torch.Tensor, bits: int, granularity: str = "kernel") -> torch.Tensor:
    """The weight function of a loaded packed student: its weight is stored on its grid already.

    Quantizing those values again would move some rows by a rounding step, since the range of a quantized row
    is not the range of the trained row it came from.
    """
    return weight


def _part_sizes(info: dict) -> dict[str, int]:
    """How much of each shared tensor a layer of the table takes."""
    return {"codes": packed_bytes(math.prod(info["shape"]), info["bits"]), "scales": info["rows"],
            "zero_points": packed_bytes(info["rows"], info["zero_point_bits"])}


def _unpacked_weights(tensors: dict, layers: dict, granularity: str) -> dict[str, torch.Tensor]:
    """The quantized weight of every layer of the table ``layers``, by state-dict key."""
    weights, start = {}, dict.fromkeys(PARTS, 0)
    for name, info in layers.items():
        shape, bits, rows = tuple(info["shape"]), info["bits"], info["rows"]
        piece = {}
        for part, size in _part_sizes(info).items():
            piece[part] = tensors[f"quantized.{part}"][start[part]:start[part] + size]
            start[part] += size
        codes = unpack_bits(piece["codes"], bits, math.prod(shape)) - 2 ** (bits - 1)
        for index, code in info.get("overflow", ()):
            codes[index] = code
        zero_point = unpack_bits(piece["zero_points"], info["zero_point_bits"], rows) + info["zero_point_min"]
        weights[f"{name}.weight"] = dequantize(QuantizedWeight(codes.view(rows, -1), zero_point, piece["scales"],
                                                               shape, bits, granularity))
    return weights


def load_packed(path: str) -> nn.Module:
    """The fake-quantized student saved in the packed file ``path``, in eval mode on the CPU.

    Its quantized weights are those of the student that was packed, bit for bit, and used as stored
    (:func:`weights_on_grid`); activations are quantized as the run did (``act_mode``, tracked ranges).
    """
    tensors, metadata = read_packed(path)
    options = packed_options(metadata)
    try:
        layers = json.loads(metadata["layers"])
        state = {key: value for key, value in tensors.items() if not key.startswith("quantized.")}
        granularity = StudentSpec.from_dict(options).weight.granularity
        state.update(_unpacked_weights(tensors, layers, granularity))
    except (KeyError, ValueError, RuntimeError) as error:
        raise RunFileError(f"{path!r}: the packed weights are incomplete or damaged ({error})") from None
    student = build_student(options, state, path)
    loaded = quantized_layers(student)
    if set(loaded) != set(layers):
        raise RunFileError(f"{path!r}: the packed layers ({len(layers)}) are not the quantized layers of "
                           f"{options['network']} ({len(loaded)})")
    for layer in loaded.values():
        layer.weight_fn = weights_on_grid
    return student
