"""GranQ's distillation of the student: the default (and so far only official) student loss term."""

import torch

from .generator import entropy
from .registry import register_student_loss

__all__ = ["kd", "kd_loss"]


def kd_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """-temperature**2 * mean(entropy(softmax((T - S) / temperature)))."""
    return -temperature**2 * entropy(teacher - student, temperature).mean()


@register_student_loss("kd")
def kd(batch, options) -> torch.Tensor:
    """GranQ (and AdaDFQ) distillation: -T^2 * mean_n H(softmax((t_n - s_n) / T)), T = ``temperature``.

    H is the entropy; t, s the teacher's and the student's logits. Minimising it drives the difference t - s
    towards a constant, i.e. the student's softmax towards the teacher's.
    """
    return kd_loss(batch.teacher_logits.detach(), batch.student_logits, options.temperature)
