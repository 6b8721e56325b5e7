"""Learning-rate schedules of the student and the generator."""

__all__ = ["LR_POLICIES", "learning_rate"]

LR_POLICIES = ("multi_step", "const")


def learning_rate(base: float, policy: str, steps, decay: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): multi_step multiplies by ``decay`` at each step passed.

    >>> [learning_rate(1.0, "multi_step", [1, 2], 0.5, e) for e in range(3)]
    [1.0, 0.5, 0.25]
    """
    if policy == "const":
        return base
    return base * decay ** sum(epoch >= step for step in steps)
