"""Test sets for evaluation: the decoding loaders, the evaluation cache (decoded once into a uint8 array) and
the loaders' workers. Training never reads real data. Imports :mod:`utils.system` and :mod:`utils.models`
(for each model's test transform).
"""

from .loaders import NORMALIZATION, build_test_loader, eval_transform, find_image_folder, normalization

__all__ = ["NORMALIZATION", "build_test_loader", "eval_transform", "find_image_folder", "normalization"]
