"""The optimizers of the student and the generator, and their learning-rate schedules."""

import math

import torch

__all__ = ["LR_POLICIES", "build_optimizers", "learning_rate", "set_learning_rates", "student_progress"]

LR_POLICIES = ("multi_step", "const", "cosine")


def learning_rate(base: float, policy: str, steps, decay: float, epoch: int, iteration: int = 0,
                  iters_per_epoch: int = 1, first_epoch: int = 0, epochs: int = 1) -> float:
    """Learning rate at ``iteration`` of ``epoch`` (both 0-based).

    ``multi_step`` multiplies ``base`` by ``decay`` at each epoch in ``steps`` passed; ``const`` keeps it;
    ``cosine`` decays it per iteration from ``base`` at the start of ``first_epoch`` (the network's first
    training epoch) to 0 at the end of epoch ``epochs``: base * (1 + cos(pi * t)) / 2, t the fraction done.

    >>> [learning_rate(1.0, "multi_step", [1, 2], 0.5, e) for e in range(3)]
    [1.0, 0.5, 0.25]
    >>> [learning_rate(1.0, "cosine", [], 0.1, e, i, iters_per_epoch=2, epochs=2) for e in (0, 1) for i in (0, 1)]
    [1.0, 0.8535533905932737, 0.5, 0.14644660940672627]
    """
    if policy == "const":
        return base
    if policy == "cosine":
        total = (epochs - first_epoch) * iters_per_epoch
        done = (epoch - first_epoch) * iters_per_epoch + iteration
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
        return base * (1 + math.cos(math.pi * fraction)) / 2
    return base * decay ** sum(epoch >= step for step in steps)


def set_learning_rates(options, opt_S, opt_G, epoch: int, iteration: int = 0) -> tuple[float, float]:
    """Set both optimizers' learning rates for ``iteration`` of ``epoch`` (0-based); return (lr_S, lr_G).

    A cosine schedule runs over the epochs each network trains in: the student's starts after warm-up.
    """
    o = options
    rates = []
    for net, optimizer, first_epoch in (("S", opt_S, o.warmup_epochs), ("G", opt_G, 0)):
        rates.append(learning_rate(*o.schedule(net), epoch, iteration, o.iters_per_epoch, first_epoch, o.nEpochs))
        for group in optimizer.param_groups:
            group["lr"] = rates[-1]
    return tuple(rates)


def student_progress(options, epoch: int, iteration: int) -> float:
    """Share of the student's training done at ``iteration`` of ``epoch``: 0 at its first (the first after
    warm-up), (n - 1) / n at its last of n; 0 during warm-up."""
    o = options
    total = (o.nEpochs - o.warmup_epochs) * o.iters_per_epoch
    done = (epoch - o.warmup_epochs) * o.iters_per_epoch + iteration
    return min(max(done / total, 0.0), 1.0) if total > 0 else 0.0

def build_optimizers(options, student_params, generator_params) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The student's optimizer (``opt_type``: Nesterov SGD or Adam) and the generator's Adam, as the official code."""
    o = options
    if o.opt_type == "Adam":
        opt_S = torch.optim.Adam(student_params, lr=o.lr_S, weight_decay=o.weightDecay)
    else:
        opt_S = torch.optim.SGD(student_params, lr=o.lr_S, momentum=o.momentum, weight_decay=o.weightDecay,
                                nesterov=True)
    return opt_S, torch.optim.Adam(generator_params, lr=o.lr_G, betas=(o.b1, o.b2))
