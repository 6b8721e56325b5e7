"""Models: the registry of network names, the option-A ResNet-20 it registers, and the teachers built from it.

``registry`` resolves a name (a registered model, pytorchcv, ``torchvision:NAME`` or ``MODULE:FUNCTION``) to a
:class:`ModelSpec`; ``resnet_a`` registers ``resnet20a_cifar10``; ``teachers`` builds a teacher with its weights
and checks it. This package imports only :mod:`utils.system` and the registry class of ``quantization_utils``
(which never imports it).
"""

from . import resnet_a  # noqa: F401  (registers resnet20a_cifar10)
from .registry import (
    IMAGENET_CROP_RATIO,
    EvalTransform,
    ModelSpec,
    download_to_cache,
    get_model_spec,
    model_names,
    register_model,
)
from .teachers import build_teacher, check_teacher, example_image, fetch_teacher_weights, load_weights_file

__all__ = ["EvalTransform", "IMAGENET_CROP_RATIO", "ModelSpec", "build_teacher", "check_teacher", "download_to_cache",
           "example_image", "fetch_teacher_weights", "get_model_spec", "load_weights_file", "model_names",
           "register_model"]
