"""The optimizers of the student and the generator, and their learning-rate schedules."""

import torch

__all__ = ["LR_POLICIES", "build_optimizers", "learning_rate"]

LR_POLICIES = ("multi_step", "const")


def learning_rate(base: float, policy: str, steps, decay: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): multi_step multiplies by ``decay`` at each step passed.

    >>> [learning_rate(1.0, "multi_step", [1, 2], 0.5, e) for e in range(3)]
    [1.0, 0.5, 0.25]
    """
    if policy == "const":
        return base
    return base * decay ** sum(epoch >= step for step in steps)


def build_optimizers(options, student_params, generator_params) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The student's optimizer (``opt_type``: Nesterov SGD or Adam) and the generator's Adam, as the official code."""
    o = options
    if o.opt_type == "Adam":
        opt_S = torch.optim.Adam(student_params, lr=o.lr_S, weight_decay=o.weightDecay)
    else:
        opt_S = torch.optim.SGD(student_params, lr=o.lr_S, momentum=o.momentum, weight_decay=o.weightDecay,
                                nesterov=True)
    return opt_S, torch.optim.Adam(generator_params, lr=o.lr_G, betas=(o.b1, o.b2))
