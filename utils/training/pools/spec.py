"""What defines a pool: one frozen spec of the synthesis settings, checked when built, and the cache key made from it.

The spec's fields are the config keys that change a pool's bytes (:data:`SYNTHESIS_KEYS`) and those of the teacher's
input and classes; the key adds the SHA-256 of the teacher's weights. Every run that asks for the same spec of the
same teacher reads the same pool, whatever its bit widths, seed or student settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ...system.errors import ConfigError

__all__ = ["FORMAT", "GENERATOR_KEYS", "IMAGE_SOURCES", "SYNTHESIS_KEYS", "PoolSpec", "check_pool_options"]

FORMAT = 1  # of the pool's files and of its key: bump when either changes in a way older pools cannot be read
IMAGE_SOURCES = ("generator", "pool")
# Config keys that only the generator reads: a run on a pool, which has none, refuses them away from their defaults.
GENERATOR_KEYS = ("generator", "generator_loss", "latent_dim", "lr_G", "lrPolicy_G", "step_G", "decayRate_G", "b1",
                  "b2", "alpha_ds", "alpha_as", "lambda_l", "lambda_u", "beta", "gamma")


@dataclass(frozen=True)
class PoolSpec:
    """The settings a pool is synthesised with, named as their config keys (docs/methods.md)."""

    pool_size: int  # images
    pool_batch: int  # images optimised together (their BatchNorm statistics are matched as one batch)
    pool_iters: int  # Adam steps per batch
    pool_lr: float  # Adam's learning rate, lowered by ReduceLROnPlateau ...
    pool_min_lr: float  # ... down to this
    pool_patience: int  # ... after this many steps without improvement
    pool_beta: float  # weight of the focal cross-entropy towards each image's label
    pool_gamma: float  # its focusing exponent
    pool_bns_weight: float  # weight of the BatchNorm-statistics loss
    pool_lbns_weight: float  # weight of the statistics of the class centres in the deeper layers (0: none)
    pool_center_iters: int  # Adam steps per batch of class centres
    pool_aug_prob: float  # per step, the chance that the teacher sees randomly cropped and flipped images
    pool_aug_scale: float  # the smallest area share of those crops
    pool_seed: int
    network: str
    img_size: int
    channels: int
    nClasses: int

    @classmethod
    def from_options(cls, options) -> PoolSpec:
        """The spec of ``options`` (any object with the keys as attributes), checked."""
        return cls(**{field.name: getattr(options, field.name) for field in dataclasses.fields(cls)}).check()

    def check(self) -> PoolSpec:
        """Raise :class:`ConfigError` naming the first key out of range; return the spec."""
        for key in ("pool_size", "pool_batch", "pool_iters", "pool_center_iters"):
            _at_least(key, getattr(self, key), 1)
        for key in ("pool_patience", "pool_seed"):
            _at_least(key, getattr(self, key), 0)
        for key in ("pool_min_lr", "pool_beta", "pool_gamma", "pool_bns_weight", "pool_lbns_weight"):
            _at_least(key, getattr(self, key), 0)
        if not 0 < self.pool_lr or self.pool_min_lr > self.pool_lr:
            raise ConfigError(f"pool_lr = {self.pool_lr} must be positive and at least pool_min_lr = "
                              f"{self.pool_min_lr}")
        if not 0 <= self.pool_aug_prob <= 1:
            raise ConfigError(f"pool_aug_prob = {self.pool_aug_prob} must be in [0, 1]")
        if not 0 < self.pool_aug_scale <= 1:
            raise ConfigError(f"pool_aug_scale = {self.pool_aug_scale} must be in (0, 1]: the smallest share of "
                              f"an image's area that a crop keeps")
        if self.pool_bns_weight == self.pool_beta == self.pool_lbns_weight == 0:
            raise ConfigError("pool_bns_weight, pool_beta and pool_lbns_weight are all 0: the pool's images would "
                              "stay noise; give at least one of them a weight")
        return self

    @property
    def batches(self) -> list[int]:
        """The size of each batch: ``pool_batch`` each, the last one what is left."""
        full, rest = divmod(self.pool_size, self.pool_batch)
        return [self.pool_batch] * full + ([rest] if rest else [])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self, teacher_sha256: str) -> str:
        """The SHA-256 (hex) of this spec, the teacher's weights and the file format: the pool's name in the cache."""
        text = json.dumps({"format": FORMAT, "teacher_sha256": teacher_sha256, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


SYNTHESIS_KEYS = tuple(field.name for field in dataclasses.fields(PoolSpec))


def check_pool_options(options) -> PoolSpec:
    """Check the pool keys of ``options`` (a dataclass of config keys) and return its :class:`PoolSpec`; raise
    :class:`ConfigError` naming a key out of range, and, where ``image_source = pool``, the keys of
    :data:`GENERATOR_KEYS` that are set away from their defaults (``generator`` may name the dataset's own)."""
    if options.image_source not in IMAGE_SOURCES:
        raise ConfigError(f"image_source = {options.image_source!r} is not valid; choose one of: "
                          f"{', '.join(IMAGE_SOURCES)}")
    spec = PoolSpec.from_options(options)
    if not 0 < options.pool_crop_scale <= 1:
        raise ConfigError(f"pool_crop_scale = {options.pool_crop_scale} must be in (0, 1]")
    if options.image_source != "pool":
        return spec
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(options)}
    own_generator = dataclasses.replace(options, generator="").generator_kind
    changed = [key for key in GENERATOR_KEYS if getattr(options, key) != defaults[key]
               and not (key == "generator" and options.generator == own_generator)]
    if changed:
        values = ", ".join(f"{key} = {getattr(options, key)!r} (default {defaults[key]!r})" for key in changed)
        raise ConfigError(f"image_source = pool trains no generator, so {values} would have no effect: leave "
                          f"{'it' if len(changed) == 1 else 'them'} at the default, or set image_source = generator")
    return spec


def _at_least(key: str, value, minimum) -> None:
    if value < minimum:
        raise ConfigError(f"{key} = {value} must be at least {minimum}")
