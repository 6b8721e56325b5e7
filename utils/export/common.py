"""What the export modules share: optional packages, the student that a run file's options and weights rebuild,
and what an exported file's metadata records of it."""

from __future__ import annotations

import importlib
import json

import torch.nn as nn

from quantization_utils import StudentSpec, rebuild_student

from ..models import get_model_spec
from ..system.errors import UserError
from ..training.checkpoints import RunFileError

__all__ = ["PIP_NAMES", "build_student", "require", "student_metadata"]

# Import name -> pip name of the packages the exporter needs beyond requirements.txt.
PIP_NAMES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "safetensors": "safetensors", "onnxscript": "onnxscript"}


def require(name: str):
    """Import the optional package ``name``; a UserError naming it (and how to install it) when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pip_name = PIP_NAMES.get(name.split(".")[0], name)
        raise UserError(f"the exporter needs the package {pip_name!r}, which is not installed: "
                        f"pip install {pip_name} (or pip install -r requirements-dev.txt)") from None


def build_student(options: dict, state_dict: dict, source: str) -> nn.Module:
    """The fake-quantized student of a run's ``options`` (a dict, as saved) with ``state_dict``, in eval mode, the
    float architecture taken from the model registry (random initialisation, nothing downloaded). ``source``
    names the file in errors (:class:`RunFileError`)."""
    if "network" not in options:
        raise RunFileError(f"{source!r}: the saved options name no network; cannot rebuild the student")
    float_model = get_model_spec(options["network"]).build()
    try:
        return rebuild_student(float_model, StudentSpec.from_dict(options), state_dict)
    except ValueError as error:
        raise RunFileError(f"{source!r} ({options['network']}): {error}") from None


def student_metadata(spec: StudentSpec, network: str, dataset: str) -> dict[str, str]:
    """What an exported file's metadata records of its student, as text: the spec's dict
    (:meth:`~quantization_utils.StudentSpec.to_dict`; numbers and lists as JSON), the network and the dataset."""
    values = {**spec.to_dict(), "network": network, "dataset": dataset}
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}
