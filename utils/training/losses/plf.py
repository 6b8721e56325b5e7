"""PLF (Fan, Wang, Guo and Wang, "Data-Free Quantization via Pseudo-label Filtering", CVPR 2024): hard labels for
the samples the teacher is sure of, its two best classes for the others."""

import math

import torch
import torch.nn.functional as F

from .generator import entropy
from .registry import register_student_loss

__all__ = ["pseudo_label", "pseudo_label_threshold"]


def pseudo_label_threshold(upper: float, lower: float, progress: float) -> float:
    """The reliability threshold after ``progress`` (0 to 1) of the student's training: linear from ``upper`` to
    ``lower``.

    >>> round(pseudo_label_threshold(0.5, 0.2, 0.5), 6)
    0.35
    """
    return upper - (upper - lower) * progress


@register_student_loss("pseudo_label")
def pseudo_label(batch, options) -> torch.Tensor:
    """PLF's pseudo-label loss: with p = softmax(t_n) of the teacher, its normalised self-entropy
    h_n = H(p) / log(C), and the threshold theta falling linearly from ``pseudo_label_upper`` to
    ``pseudo_label_lower`` over the student's training (:func:`pseudo_label_threshold`),

        reliable (h_n < theta):  CE(s_n, k1)
        the others:              beta * (p1 / (p1 + p2) * CE(s_n, k1) + p2 / (p1 + p2) * CE(s_n, k2))

    where k1, k2 are the teacher's top-2 classes and p1, p2 their probabilities; L = w * mean over the batch.
    PLF's values: theta from 0.5 to 0.2 and beta = ``pseudo_label_beta`` = 0.3 on CIFAR (CIFAR/cifar_common.hocon),
    0.4 to 0.1 and beta = 0.5 on ImageNet (ImageNet/imagenet_common.hocon).

    Choices where the paper leaves room: the threshold falls per iteration over the epochs the student trains
    (after warm-up), the mean runs over the whole batch, and w = ``pseudo_label_weight`` (default 1) scales the term
    beside the distillation term.
    """
    teacher = batch.teacher_logits.detach()
    normalised = entropy(teacher) / math.log(teacher.shape[1])
    threshold = pseudo_label_threshold(options.pseudo_label_upper, options.pseudo_label_lower, batch.progress)
    reliable = (normalised < threshold).to(batch.student_logits.dtype)
    top, classes = F.softmax(teacher, dim=1).topk(2, dim=1)
    share = top / top.sum(dim=1, keepdim=True)  # p1 / (p1 + p2), p2 / (p1 + p2)
    log_p = F.log_softmax(batch.student_logits, dim=1)
    ce_first, ce_second = (-log_p.gather(1, classes)).unbind(dim=1)
    mixed = share[:, 0] * ce_first + share[:, 1] * ce_second
    per_sample = reliable * ce_first + (1 - reliable) * options.pseudo_label_beta * mixed
    return options.pseudo_label_weight * per_sample.mean()
