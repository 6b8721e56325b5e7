"""Synthesising a pool's images: noise optimised so that the teacher sees its BatchNorm statistics and a label.

A batch (:class:`Synthesis.batch`), as in HAST's and SynQ's released generators (pool_methods.md): ``pool_batch``
images from ``torch.randn`` and a label each, uniform over the classes; Adam (``pool_lr``) with ReduceLROnPlateau
(``pool_min_lr``, ``pool_patience``) on the images for ``pool_iters`` steps, minimising

    pool_bns_weight * BNS + pool_beta * mean_n (1 - p_n)^pool_gamma * CE_n + pool_lbns_weight * LBNS

BNS: the mean over the teacher's BatchNorms of MSE(batch mean, running mean) + MSE(batch var, running var) of their
inputs (ZeroQ, HAST); p_n the teacher's probability of image n's label (HAST's hard-sample weighting). With
probability ``pool_aug_prob`` per step the teacher sees the images randomly cropped and flipped
(:func:`.augment.random_resized_crops`, smallest area share ``pool_aug_scale``): SynQ's and HAST's ImageNet data.

LBNS, SynQ's ``--lbns`` option, which its ImageNet data was made with (its config reads ``imagenet_lbns``): one
image per class (the class centres, :meth:`Synthesis.centres`) is synthesised first, and the deeper half of the
BatchNorms is also pulled towards the statistics of those centres: sum over layers n >= (L + 2) // 2 - 2 of
MSE(batch mean, centre mean) + MSE(batch var, centre var), divided by L times the batch size (SynQ's code).

Each batch draws everything random (its noise, its labels, its crops) from a ``torch.Generator`` of its own, seeded
from ``pool_seed`` and the batch's index: a batch's images do not depend on which batches were made before it or in
which process, so a synthesis that stops and resumes gives the bytes of one that did not stop (on the same device
and software).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...system.errors import UserError
from ..losses import BNStatistics
from ..progress import Progress
from .augment import random_resized_crops
from .spec import PoolSpec

__all__ = ["CENTRE_CE_WEIGHT", "CENTRE_LAYER_WEIGHTS", "CENTRE_MIN_LR", "FOCAL_FLOOR", "Synthesis", "deeper_layers",
           "focal_cross_entropy"]

logger = logging.getLogger("granq")

# SynQ's class centres (``generate_calib_centers`` in its ``distill_data.py``): cross-entropy weight 5, the learning
# rate lowered no further than 0.05, and the BatchNorm terms weighted 0.2 in the shallow and 1.1 in the deeper layers.
CENTRE_CE_WEIGHT = 5.0
CENTRE_MIN_LR = 0.05
CENTRE_LAYER_WEIGHTS = (0.2, 1.1)
# Mixed into the seeds of the batches' generators, one stream per kind of batch.
STREAMS = {"pool": 0x706F6F6C, "centres": 0x63656E74}


def deeper_layers(count: int) -> int:
    """The index of the first of ``count`` BatchNorms (in forward order) that SynQ's code counts as deep."""
    return (count + 2) // 2 - 2


# Floor of 1 - p in the focal weight: where the softmax saturates (p = 1 in float32) the weight and the
# cross-entropy are 0, but the gradient of (1 - p)^gamma, gamma < 1, is infinite, and 0 * inf makes the images NaN.
FOCAL_FLOOR = 1e-12


def focal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """beta * mean_n (1 - p_n)^gamma * CE(logits_n, y_n), p_n = softmax(logits_n)[y_n]: HAST's cross-entropy, which
    weighs the images the teacher finds hard more (gamma = 0: plain cross-entropy). The weight is not detached, as
    in HAST's and SynQ's code; its base 1 - p_n is floored at :data:`FOCAL_FLOOR` (their code takes NaN gradients
    where p_n rounds to 1). beta = 0: no term at all (0, without a gradient).

    >>> logits, labels = torch.tensor([[40.0, 0.0]], requires_grad=True), torch.tensor([0])
    >>> focal_cross_entropy(logits, labels, 1.0, 0.5).backward(); bool(torch.isfinite(logits.grad).all())
    True
    """
    if beta == 0:
        return logits.new_zeros(())
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return beta * ((1 - p).clamp(min=FOCAL_FLOOR).pow(gamma) * ce).mean()


@contextlib.contextmanager
def _nondeterministic_backward_allowed():
    """Cropping and resizing have no deterministic CUDA backward pass; a pool is made once and cached, so under
    ``deterministic = true`` its synthesis only warns about them."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


class Synthesis:
    """Optimises the batches of a pool of ``spec`` for ``teacher`` on ``device``; :meth:`close` removes its hooks."""

    def __init__(self, spec: PoolSpec, teacher: nn.Module, device: torch.device, log_interval: int = 50,
                 show_progress: bool = True):
        self.spec, self.device = spec, device
        self.teacher = teacher.to(device).eval()
        self.bn_stats = BNStatistics(self.teacher)
        self.log_interval, self.show_progress = log_interval, show_progress
        self.centre_targets = None  # (mean, var) per BatchNorm of the class centres, for LBNS

    def close(self) -> None:
        self.bn_stats.remove()

    def generator(self, stream: str, index: int) -> torch.Generator:
        """The random stream of batch ``index`` of kind ``stream`` (``pool`` or ``centres``)."""
        seed = np.random.SeedSequence([self.spec.pool_seed, STREAMS[stream], index]).generate_state(1, np.uint64)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _shape(self, size: int) -> tuple[int, ...]:
        return size, self.spec.channels, self.spec.img_size, self.spec.img_size

    def batch(self, index: int, size: int) -> dict:
        """Batch ``index`` of the pool (``size`` images): its images and labels (on the CPU) and what it recorded."""
        s = self.spec
        generator = self.generator("pool", index)
        images = torch.randn(self._shape(size), generator=generator, device=self.device)
        labels = torch.randint(0, s.nClasses, (size,), generator=generator, device=self.device)
        first = deeper_layers(len(self.bn_stats))

        def loss(logits):
            # LBNS reads the captured statistics before loss() hands them over
            layers = self.bn_stats.layer_losses(self.centre_targets) if s.pool_lbns_weight > 0 else None
            terms = {"bns": self.bn_stats.loss(), "ce": focal_cross_entropy(logits, labels, s.pool_beta, s.pool_gamma)}
            total = s.pool_bns_weight * terms["bns"] + terms["ce"]
            if layers is not None:
                terms["lbns"] = layers[first:].sum() / (len(layers) * size)
                total = total + s.pool_lbns_weight * terms["lbns"]
            return total, terms

        def augment(x):
            if s.pool_aug_prob > 0 and torch.rand((), generator=generator, device=self.device).item() < s.pool_aug_prob:
                return random_resized_crops(x, generator, s.pool_aug_scale)
            return x

        return self._optimise(images, labels, loss, augment, s.pool_iters, s.pool_min_lr, f"pool batch {index + 1}")

    def centres(self, index: int) -> dict:
        """Batch ``index`` of SynQ's class centres: classes index * pool_batch, ..., one image each, the batch filled
        up with class 0 as in SynQ's code."""
        s = self.spec
        generator = self.generator("centres", index)
        classes = torch.arange(index * s.pool_batch, min((index + 1) * s.pool_batch, s.nClasses), device=self.device)
        labels = F.pad(classes, (0, s.pool_batch - len(classes)))
        images = torch.randn(self._shape(s.pool_batch), generator=generator, device=self.device)
        count = len(self.bn_stats)
        weights = torch.tensor([CENTRE_LAYER_WEIGHTS[n >= deeper_layers(count)] for n in range(count)],
                               device=self.device)

        def loss(logits):
            terms = {"bns": (weights * self.bn_stats.layer_losses()).sum() / count,
                     "ce": CENTRE_CE_WEIGHT * F.cross_entropy(logits, labels)}
            return terms["bns"] + terms["ce"], terms

        return self._optimise(images, labels, loss, lambda x: x, s.pool_center_iters, CENTRE_MIN_LR,
                              f"class centres {index + 1}")

    def centre_batches(self) -> int:
        return math.ceil(self.spec.nClasses / self.spec.pool_batch)

    def set_centres(self, batches: list[torch.Tensor]) -> None:
        """The LBNS targets: the statistics of each BatchNorm's input over all the centre images (``batches``),
        pooled over the batches (the mean of the batch means; the mean of the batch variances plus the variance of
        the batch means, every batch weighted by its size)."""
        sums = None
        total = 0
        with torch.no_grad():
            for images in batches:
                with self.bn_stats.capture():
                    self.teacher(images.to(self.device))
                n = len(images)
                stats = [(n * mean, n * var, n * mean.square()) for mean, var in self.bn_stats.batch_statistics()]
                sums = stats if sums is None else [tuple(a + b for a, b in zip(x, y)) for x, y in zip(sums, stats)]
                total += n
        self.centre_targets = [(mean / total, var / total + square / total - (mean / total).square())
                               for mean, var, square in sums]

    def _optimise(self, images, labels, loss, augment, iters: int, min_lr: float, name: str) -> dict:
        started = time.time()
        initial = self._measure(images, labels)
        images.requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=self.spec.pool_lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, min_lr=min_lr,
                                                               patience=self.spec.pool_patience)
        progress = Progress(0, 1, iters, 0, enabled=self.show_progress, unit=name)
        shown = []
        with _nondeterministic_backward_allowed():
            for it in range(iters):
                with self.bn_stats.capture():
                    logits = self.teacher(augment(images))
                total, terms = loss(logits)
                optimizer.zero_grad(set_to_none=True)
                total.backward(inputs=[images])
                optimizer.step()
                value = total.item()
                if not math.isfinite(value):
                    raise UserError(f"pool: {name}: the synthesis loss became {value} at step {it + 1} (its terms: "
                                    f"{', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); lower pool_lr "
                                    f"or the loss weights")
                scheduler.step(value)
                shown.append(torch.stack([total.detach(), *terms.values()]))
                if (it + 1) % self.log_interval == 0 or it + 1 == iters:
                    values = torch.stack(shown).mean(0).tolist()
                    progress.update(it + 1, {"loss": values[0], **dict(zip(terms, values[1:])),
                                             "lr": optimizer.param_groups[0]["lr"]})
                    shown = []
        progress.close()
        images = images.detach()
        final = self._measure(images, labels)
        return {"images": images.cpu(), "labels": labels.cpu(), "initial_bns": initial["bns"],
                "final_bns": final["bns"], "teacher_acc": final["teacher_acc"], "seconds": time.time() - started}

    def _measure(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """The BN-statistics loss of ``images`` as they are (no augmentation) and the teacher's accuracy on their
        labels."""
        with torch.no_grad(), self.bn_stats.capture():
            logits = self.teacher(images)
        return {"bns": self.bn_stats.loss().item(), "teacher_acc": (logits.argmax(1) == labels).float().mean().item()}
