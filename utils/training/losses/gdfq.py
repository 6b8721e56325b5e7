"""GDFQ (Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020): the student's distillation by
KL divergence and its cross-entropy toward the generator's labels. HAST, IntraQ and SynQ fine-tune with the same
KL term (their code: ``loss_fn_kd``)."""

import torch
import torch.nn.functional as F

from .registry import register_student_loss

__all__ = ["ce", "kl"]


@register_student_loss("kl")
def kl(batch, options) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t / T) || softmax(s / T)), T = ``temperature``, alpha = ``alpha``.

    ``kl_reduction`` says what the KL divergence is averaged over, as torch's ``KLDivLoss`` names it: ``batchmean``
    sums over the classes and averages over the batch (HAST's and SynQ's code; SynQ: alpha = T = 20); ``mean``
    averages over batch and classes, i.e. 1 / classes of it (GDFQ's ``nn.KLDivLoss()``, its torch's default; GDFQ:
    alpha = 1, T = 20). The teacher's probabilities are the target (no gradient).
    """
    temperature = options.temperature
    divergence = F.kl_div(F.log_softmax(batch.student_logits / temperature, dim=1),
                          F.log_softmax(batch.teacher_logits.detach() / temperature, dim=1),
                          reduction="batchmean", log_target=True)
    if options.kl_reduction == "mean":  # what torch's "mean" gives, without its warning that it will change
        divergence = divergence / batch.student_logits.shape[1]
    return options.alpha * temperature**2 * divergence


@register_student_loss("ce")
def ce(batch, options) -> torch.Tensor:
    """w * CE(s, y): the student's cross-entropy toward the class y each image was made for, over the whole batch;
    w = ``ce_weight`` (GDFQ: 1). ``reliable_ce`` keeps the samples the teacher finds easy only (SynQ)."""
    return options.ce_weight * F.cross_entropy(batch.student_logits, batch.labels)
