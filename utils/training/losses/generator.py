"""Losses of the generator: AdaSG/AdaDFQ's one-hot and marginal losses (GranQ's), GDFQ's cross-entropy, the
BN-statistics loss they all add, and the entropy they share with the distillation term. ``generator_loss`` picks
the combination (:data:`GENERATOR_LOSSES`, :func:`generator_loss`)."""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BNStatistics", "GENERATOR_LOSSES", "entropy", "generator_loss", "marginal_loss", "onehot_loss"]


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample entropy of softmax(logits / temperature)."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def onehot_loss(teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor,
                alpha_ds: float, alpha_as: float) -> torch.Tensor:
    """alpha_ds * CE(softmax(T - S), y) + alpha_as * CE(softmax(T + S), y)."""
    return (alpha_ds * F.cross_entropy(teacher - student, labels)
            + alpha_as * F.cross_entropy(teacher + student, labels))


def marginal_loss(teacher: torch.Tensor, student: torch.Tensor, num_classes: int,
                  lambda_l: float, lambda_u: float) -> torch.Tensor:
    """Keep the normalised disagreement entropy h' of each sample inside [lambda_l, lambda_u].

    h = entropy(softmax(T - S)); h' = (h - min h) / (log(num_classes) - min h);
    loss = mean(relu(lambda_l - h')) + mean(relu(h' - lambda_u)). Works for any batch size.
    """
    h = entropy(teacher - student)
    h_min = h.min()
    h_norm = (h - h_min) / (math.log(num_classes) - h_min)
    return F.relu(lambda_l - h_norm).mean() + F.relu(h_norm - lambda_u).mean()


class BNStatistics:
    """Batch statistics of the inputs of every BatchNorm of a model, for the BN-statistics loss.

    Hooks are registered by module name and collect only inside :meth:`capture`, so evaluation
    passes cost nothing. Call :meth:`remove` to detach them.
    """

    def __init__(self, model: nn.Module):
        self._layers = {name: module for name, module in model.named_modules()
                        if isinstance(module, nn.modules.batchnorm._BatchNorm)}
        if not self._layers:
            raise ValueError("the teacher has no BatchNorm layer: the BN-statistics loss needs one")
        self._handles = {name: module.register_forward_hook(self._hook) for name, module in self._layers.items()}
        self._collecting = False
        self._stats: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []

    def _hook(self, module, inputs, output):
        if self._collecting:
            x = inputs[0]
            # Statistics per channel (dim 1) over every other dim: (N, C) and (N, C, L) for BatchNorm1d,
            # (N, C, H, W) for 2d, (N, C, D, H, W) for 3d. Two passes (mean, then the mean squared deviation)
            # give the biased variance of var_mean(..., correction=0) up to rounding, several times faster on
            # the CPU than its one-pass (Welford) kernel.
            dims = (0, *range(2, x.dim()))
            mean = x.mean(dim=dims)
            var = (x - mean.view(-1, *[1] * (x.dim() - 2))).square().mean(dim=dims)
            self._stats.append((mean, var, module))

    @contextmanager
    def capture(self):
        self._stats.clear()
        self._collecting = True
        try:
            yield self
        finally:
            self._collecting = False

    def loss(self) -> torch.Tensor:
        """Mean over layers of MSE(batch mean, running_mean) + MSE(biased batch var, running_var).

        The collected statistics are handed over to the loss: none stays here, so that nothing this object holds
        keeps the iteration's autograd graph alive after it (a CUDA graph capture must not meet a graph of an
        eager iteration)."""
        stats, self._stats = self._stats, []
        if len(stats) != len(self._layers):
            raise RuntimeError(f"captured {len(stats)} BatchNorm inputs, expected {len(self._layers)}")
        total = sum(F.mse_loss(mean, module.running_mean) + F.mse_loss(var, module.running_var)
                    for mean, var, module in stats)
        return total / len(stats)

    def __len__(self) -> int:
        """The number of BatchNorm layers."""
        return len(self._layers)

    def batch_statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mean, biased variance) per channel of each BatchNorm's input in the last capture, in forward order."""
        return [(mean, var) for mean, var, _ in self._stats]

    def layer_losses(self, targets=None) -> torch.Tensor:
        """MSE(batch mean, target mean) + MSE(biased batch var, target var) of each BatchNorm in forward order, as
        one vector; the targets (a list of (mean, var) in that order) default to the running statistics. The
        statistics stay here (until :meth:`loss` takes them, or the next capture)."""
        if targets is None:
            targets = [(module.running_mean, module.running_var) for _, _, module in self._stats]
        if len(self._stats) != len(self._layers) or len(targets) != len(self._layers):
            raise RuntimeError(f"captured {len(self._stats)} BatchNorm inputs for {len(targets)} targets, expected "
                               f"{len(self._layers)}")
        return torch.stack([F.mse_loss(mean, target_mean) + F.mse_loss(var, target_var)
                            for (mean, var, _), (target_mean, target_var) in zip(self._stats, targets)])

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


def _adadfq(options, teacher, student, labels, bns):
    onehot = onehot_loss(teacher, student, labels, options.alpha_ds, options.alpha_as)
    marginal = marginal_loss(teacher, student, options.nClasses, options.lambda_l, options.lambda_u)
    return marginal + options.beta * onehot + options.gamma * bns, marginal, onehot


def _gdfq(options, teacher, student, labels, bns):
    ce = F.cross_entropy(teacher, labels)
    return ce + options.gamma * bns, torch.zeros_like(ce), ce


# generator_loss -> (options, teacher logits, student logits, labels, BN-statistics loss) -> (loss_G, marginal, onehot)
GENERATOR_LOSSES = {"adadfq": _adadfq, "gdfq": _gdfq}


def generator_loss(options, teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor,
                   bns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The generator's loss of ``options.generator_loss``, with the two parts recorded beside it: (loss_G, marginal,
    onehot).

    - ``adadfq`` (GranQ's, from AdaSG and AdaDFQ): loss_G = marginal + beta * onehot + gamma * bns, with
      :func:`onehot_loss` and :func:`marginal_loss` of the teacher's and the student's logits;
    - ``gdfq`` (Xu et al., ECCV 2020, its code's ``trainer.py``): loss_G = CE(teacher, y) + gamma * bns (GDFQ:
      gamma = 0.1), the cross-entropy of the teacher toward the generator's labels, recorded as ``onehot``
      (``marginal`` is 0); the student takes no part in it.
    """
    return GENERATOR_LOSSES[options.generator_loss](options, teacher, student, labels, bns)
