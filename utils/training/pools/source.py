"""Training on a pool: each iteration draws a batch of the pool's images, crops and flips them, and the student learns
from the teacher on them. No generator: :meth:`PoolImages.step` stands in for the generator's iteration."""

from __future__ import annotations

import torch

from ..losses import student_loss
from .augment import random_resized_crops
from .store import Pool

__all__ = ["POOL_LOSS_NAMES", "PoolImages"]

# What a pool iteration records, before the terms of student_losses (and any filter value), as the trainer's
# LOSS_NAMES for the generator's iteration.
POOL_LOSS_NAMES = ("loss_S", "teacher_acc")


class PoolImages:
    """A pool's images and labels on the training device, and the iteration that trains the student on them."""

    def __init__(self, pool: Pool | None, options, device: torch.device):
        if pool is None:
            raise ValueError("image_source = pool: the trainer needs the pool (utils.training.pools.run_pool)")
        self.images, self.labels = pool.images.to(device), pool.labels.to(device)
        self.summary = pool.summary
        self.batch_size, self.crop_scale = options.batchSize, options.pool_crop_scale
        self.calibration_batch = options.pool_batch

    def draw(self, noise: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batchSize`` images of the pool, drawn uniformly with replacement, each randomly cropped (area share
        ``pool_crop_scale`` to 1) and flipped, with their labels: the fine-tuning augmentation of HAST, IntraQ and
        SynQ. Everything random comes from ``noise``, the run's training stream, so that a resumed run draws what an
        uninterrupted one would."""
        index = torch.randint(0, len(self.labels), (self.batch_size,), generator=noise, device=self.labels.device)
        return random_resized_crops(self.images[index], noise, self.crop_scale), self.labels[index]

    def step(self, trainer, train_student: bool = True) -> torch.Tensor:
        """One iteration of ``trainer`` on the pool: the student's loss (the terms of ``student_losses`` on the
        teacher's and the student's outputs, the pool's labels as the batch's labels) and, unless ``train_student``
        is False (warm-up: the tracked activation ranges still move), the student's update.

        Both networks read the filtered images where ``student_input_filter`` sets one. Returns ``loss_S``, the
        teacher's accuracy on the labels, each term and any filter value, as the trainer's ``loss_names``."""
        images, labels = self.draw(trainer.noise)
        student_images = trainer.input_filter(images, trainer.options)
        # A term that reads layers (Grad-CAM) differentiates the teacher's logits by its features: the teacher's
        # weights are frozen, so the graph starts at its input. Otherwise the teacher runs without autograd.
        graph = bool(trainer.features.layers)
        with trainer.features.capture():
            with torch.set_grad_enabled(graph):
                teacher_logits = trainer.teacher(student_images.detach().requires_grad_() if graph else student_images)
            student_logits = trainer._student(student_images, sync=train_student)
        terms, loss_S = student_loss(trainer.student_losses, trainer.features.take(), teacher_logits, student_logits,
                                     labels, trainer.student_progress())
        if train_student:
            trainer.opt_S.zero_grad(set_to_none=True)
            loss_S.backward(inputs=trainer.student_params)
            trainer.opt_S.step()
        teacher_acc = (teacher_logits.argmax(dim=1) == labels).float().mean()
        kept = [student_images.square().sum() / images.square().sum()] if trainer.records_filter else []
        return torch.stack([loss_S, teacher_acc, *terms, *kept]).detach()

    def calibration_batches(self):
        """The pool in its order, in batches of ``pool_batch`` (those whose statistics synthesis matched), as they
        are: what a run without training (``nEpochs = 0``) calibrates tracked activation ranges on (ZeroQ)."""
        for start in range(0, len(self.labels), self.calibration_batch):
            yield self.images[start:start + self.calibration_batch]
