"""AKT (Hong et al., "Advanced Knowledge Transfer: Refined Feature Distillation for Zero-Shot Quantization in Edge
Computing", ACM SAC 2025): attention feature distillation."""

import torch
import torch.nn.functional as F

from .layers import stage_blocks
from .registry import StudentLoss, register_student_loss

__all__ = ["AttentionDistillation", "attention_kl", "channel_attention", "spatial_attention"]


def channel_attention(a: torch.Tensor) -> torch.Tensor:
    """softmax over channels of the per-channel mean of a^2: [N, C, H, W] -> [N, C]."""
    return F.softmax(a.square().mean(dim=(2, 3)), dim=1)


def spatial_attention(a: torch.Tensor) -> torch.Tensor:
    """The L2-normalised (over positions) channel mean of a^2: [N, C, H, W] -> [N, H * W]."""
    return F.normalize(a.square().mean(dim=1).flatten(1), dim=1)


def attention_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over the batch of KL(softmax(teacher / T) || softmax(student / T)) of attention vectors [N, D]."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="sum", log_target=True)


@register_student_loss("attention")
class AttentionDistillation(StudentLoss):
    """AKT's refined feature distillation: at each residual block output a (teacher) and b (student),

        L = w * sum_blocks [KL_sum(softmax(ca(a) / T) || softmax(ca(b) / T))
                            + KL_sum(softmax(sa(a) / T) || softmax(sa(b) / T))]

    with ca the channel attention (softmax over channels of the per-channel spatial mean of a^2), sa the spatial
    attention (the L2-normalised channel mean of a^2), KL_sum summed over the batch, w = ``attention_weight``
    (AKT: 1000) and T = ``attention_temperature`` (AKT: 8). Like every term it trains the student only after
    warm-up, as in AKT.

    Choices where the paper leaves room: the blocks are those of :func:`~.layers.stage_blocks` and their outputs
    are taken after the residual sum and its activation (the block's output, for the student after its activation
    quantizer); AKT's code reads pytorchcv's residual branch (``unit.body``) before the sum instead. The sum over the
    batch (not a mean) is AKT's code, so the term grows with ``batchSize``.
    """

    def layers(self, model, image):
        return stage_blocks(model)

    def __call__(self, batch):
        temperature = self.options.attention_temperature
        total = batch.student_logits.new_zeros(())
        for name in self.layer_names:
            a, b = batch.teacher_features[name].detach(), batch.student_features[name]
            total = total + attention_kl(channel_attention(a), channel_attention(b), temperature)
            total = total + attention_kl(spatial_attention(a), spatial_attention(b), temperature)
        return self.options.attention_weight * total
