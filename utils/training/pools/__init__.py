"""Synthetic image pools (``image_source = pool``): images optimised once from noise against the teacher's BatchNorm
statistics and a label each, cached on disk, then drawn from while the student trains (ZeroQ, HAST, SynQ).

``spec`` (what defines a pool and its cache key), ``augment`` (random crops and flips in tensor operations),
``synthesis`` (optimising a batch), ``store`` (the cache: files, checks, resuming, the lock) and ``source`` (the
training iteration on a pool). Imports :mod:`utils.system` and the rest of :mod:`utils.training`; docs/methods.md
describes the method and where each setting comes from.
"""

from .augment import random_resized_crops
from .source import POOL_LOSS_NAMES, PoolImages
from .spec import GENERATOR_KEYS, SYNTHESIS_KEYS, PoolSpec, check_pool_options
from .store import Pool, PoolError, load_pool, pool_folder, run_pool
from .synthesis import Synthesis, focal_cross_entropy

__all__ = ["GENERATOR_KEYS", "POOL_LOSS_NAMES", "SYNTHESIS_KEYS", "Pool", "PoolError", "PoolImages", "PoolSpec",
           "Synthesis", "check_pool_options", "focal_cross_entropy", "load_pool", "pool_folder",
           "random_resized_crops", "run_pool"]
