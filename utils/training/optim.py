"""The optimizers of the student and the generator, and their learning-rate schedules."""

import math

import torch

__all__ = ["IMPLEMENTATION_KEYS", "LR_POLICIES", "build_optimizers", "device_scalar", "learning_rate",
           "load_optimizer_state", "set_learning_rates", "student_progress"]

LR_POLICIES = ("multi_step", "const", "cosine")
# Settings of a param group that say how the optimizer computes, not what: kept from the run when a file is loaded.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable")


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


def set_learning_rates(options, opt_S, opt_G, epoch: int, iteration: int = 0,
                       progress: torch.Tensor | None = None) -> tuple[float, float]:
    """Set both optimizers' learning rates for ``iteration`` of ``epoch`` (0-based); return (lr_S, lr_G).

    A cosine schedule runs over the epochs each network trains in: the student's starts after warm-up.
    A learning rate held in a tensor (CUDA, :func:`build_optimizers`) is written in place, and so is ``progress``
    (:func:`student_progress`) where given, so that a captured CUDA graph reads the values of every iteration.
    """
    o = options
    rates = []
    for net, optimizer, first_epoch in (("S", opt_S, o.warmup_epochs), ("G", opt_G, 0)):
        rates.append(learning_rate(*o.schedule(net), epoch, iteration, o.iters_per_epoch, first_epoch, o.nEpochs))
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rates[-1])
            else:
                group["lr"] = rates[-1]
    if progress is not None:
        progress.fill_(student_progress(o, epoch, iteration))
    return tuple(rates)


def device_scalar(device: torch.device) -> torch.Tensor | None:
    """A float32 scalar on ``device`` for a value that changes every iteration (the student's progress) on CUDA,
    where a captured graph must read it from memory; None on the CPU, where the trainer keeps Python floats."""
    return torch.zeros((), device=device) if device.type == "cuda" else None


def student_progress(options, epoch: int, iteration: int) -> float:
    """Share of the student's training done at ``iteration`` of ``epoch``: 0 at its first (the first after
    warm-up), (n - 1) / n at its last of n; 0 during warm-up."""
    o = options
    total = (o.nEpochs - o.warmup_epochs) * o.iters_per_epoch
    done = (epoch - o.warmup_epochs) * o.iters_per_epoch + iteration
    return min(max(done / total, 0.0), 1.0) if total > 0 else 0.0

def build_optimizers(options, student_params, generator_params) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The student's optimizer (``opt_type``: Nesterov SGD or Adam) and the generator's Adam, as the official code.

    On CUDA both are torch's fused implementations with the learning rate in a tensor on the device, whether or not
    the iteration is replayed as a CUDA graph (``cuda_graph``), so that graphed and eager runs compute the same: a
    graph reads the learning rate from memory (a Python float would be frozen at capture), and torch's SGD takes a
    tensor learning rate without a device synchronisation only fused; Adam must also be ``capturable``. On the CPU
    they are the plain implementations with float rates.
    """
    o = options
    cuda = student_params[0].device.type == "cuda"
    settings = {"fused": True} if cuda else {}

    def rate(value: float):
        return torch.tensor(value, device=student_params[0].device) if cuda else value

    if o.opt_type == "Adam":
        opt_S = torch.optim.Adam(student_params, lr=rate(o.lr_S), weight_decay=o.weightDecay, capturable=cuda,
                                 **settings)
    else:
        opt_S = torch.optim.SGD(student_params, lr=rate(o.lr_S), momentum=o.momentum, weight_decay=o.weightDecay,
                                nesterov=True, **settings)
    return opt_S, torch.optim.Adam(generator_params, lr=rate(o.lr_G), betas=(o.b1, o.b2), capturable=cuda,
                                   **settings)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` that keeps how this run's optimizer computes.

    The file gives the values (moments, steps, learning rates); the run keeps its implementation
    (:data:`IMPLEMENTATION_KEYS`), its learning-rate tensors (written in place, so their memory stays where a
    captured graph reads it) and a fused or capturable Adam's step counts on the device. So a checkpoint written
    on the CPU resumes on CUDA and one written on CUDA resumes on the CPU, each computing as a fresh run there.
    """
    kept = [({key: group[key] for key in IMPLEMENTATION_KEYS if key in group}, group["lr"])
            for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (implementation, lr) in zip(optimizer.param_groups, kept):
        value = float(group["lr"])
        group.update(implementation)
        group["lr"] = lr.fill_(value) if isinstance(lr, torch.Tensor) else value
        if group.get("fused") or group.get("capturable"):
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    optimizer.state[param]["step"] = step.to(param.device, torch.float32)
