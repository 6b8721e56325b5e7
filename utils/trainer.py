"""Zero-shot QAT: a generator learns from the teacher, the fake-quantized student learns from both.

One trainer serves every dataset and network: the config picks the generator, the registry the model.
"""

import contextlib
import hashlib
import logging
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from quantization_utils import QuantAct, quantize_model, set_act_tracking

from . import distributed
from .errors import UserError
from .generator import build_generator
from .losses import BNStatistics, kd_loss, marginal_loss, onehot_loss
from .metrics_writer import MetricsWriter
from .plots import plot_run

__all__ = ["LOSS_NAMES", "NonFiniteLossError", "RunInterrupted", "Trainer", "evaluate", "learning_rate"]

logger = logging.getLogger("granq")

# Per-iteration values recorded on the device; read back once per log interval.
LOSS_NAMES = ("loss_G", "marginal", "onehot", "bns", "loss_S", "teacher_acc")
CHECKPOINT = "checkpoint.pt"
BEST_STUDENT = "best_student.pt"


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite."""


class RunInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def learning_rate(base: float, policy: str, steps, decay: float, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): multi_step multiplies by ``decay`` at each step passed."""
    if policy == "const":
        return base
    return base * decay ** sum(epoch >= step for step in steps)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent over ``loader`` (summed over ranks when distributed).

    Counts stay on the device until the end: one synchronisation per evaluation.
    """
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.stack([top[:, 0].sum(), top.any(dim=1).sum(), counts.new_tensor(labels.shape[0])])
    top1_hits, top5_hits, total = distributed.all_reduce(counts).tolist()
    if total == 0:
        raise UserError("the test set is empty")
    return 100.0 * top1_hits / total, 100.0 * top5_hits / total


def resnet_memory_format(device: torch.device) -> torch.memory_format:
    """Layout of the teacher and the student during training: channels_last on the CPU, where oneDNN runs
    their convolutions faster (docs/speed.md; the generator gains nothing from it)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a broken file at ``path``."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """Owns the student, the generator, their optimizers and the run state; writes into ``run_dir``."""

    def __init__(self, options, teacher: nn.Module, test_loader, device: torch.device, run_dir: str,
                 meta: dict):
        self.options = options
        self.device = device
        self.run_dir = run_dir
        self.meta = meta  # recorded in checkpoints and the summary: id, seed, teacher weights source
        self.memory_format = resnet_memory_format(device)
        self.teacher = teacher.to(device, memory_format=self.memory_format).eval()
        self.test_loader = test_loader
        self.student = self.build_student(teacher).to(device, memory_format=self.memory_format).eval()
        for parameter in self.student.parameters():
            parameter.requires_grad_(True)
        self.generator = build_generator(options).to(device).train()
        self.student_params = list(self.student.parameters())
        self.generator_params = list(self.generator.parameters())
        self.is_main = distributed.rank() == 0
        # Under torchrun both networks are wrapped in DDP (which also makes rank 0's initial weights
        # everyone's); checkpoints always hold the unwrapped modules.
        self.student_forward, self.generator_forward = self.student, self.generator
        if distributed.is_distributed():
            device_ids = [device.index] if device.type == "cuda" else None
            self.student_forward = DistributedDataParallel(self.student, device_ids=device_ids)
            self.generator_forward = DistributedDataParallel(self.generator, device_ids=device_ids)
        self.opt_S = self._student_optimizer()
        self.opt_G = torch.optim.Adam(self.generator_params, lr=options.lr_G, betas=(options.b1, options.b2))
        self.bn_stats = BNStatistics(self.teacher)
        self.epoch = 0  # next epoch to run
        self.iteration = 0  # next iteration within that epoch
        self.history = None  # per-iteration losses of the current epoch, on the device
        self.best_top1 = self.best_top5 = None
        self.last_top1 = self.last_top5 = None
        self.teacher_top1 = self.teacher_top5 = None
        self.metrics: list[dict] = []
        self.elapsed = 0.0
        self._stop_signal = None
        # Rank 0 writes metrics.jsonl (and TensorBoard scalars); a missing tensorboard fails here, early.
        self.metrics_writer = MetricsWriter(run_dir, options.tensorboard) if self.is_main else None

    def build_student(self, teacher: nn.Module) -> nn.Module:
        """The fake-quantized copy of the teacher that training distils into (benchmarks override it)."""
        o = self.options
        return quantize_model(teacher, o.qw, o.qa, o.act_mode, o.weight_granularity, granq_impl=o.granq_impl)

    def _student_optimizer(self):
        o = self.options
        if o.opt_type == "Adam":
            return torch.optim.Adam(self.student_params, lr=o.lr_S, weight_decay=o.weightDecay)
        return torch.optim.SGD(self.student_params, lr=o.lr_S, momentum=o.momentum,
                               weight_decay=o.weightDecay, nesterov=True)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "format": 1,
            "options": self.options.to_dict(),
            "meta": self.meta,
            "student": self.student.state_dict(),
            "generator": self.generator.state_dict(),
            "opt_S": self.opt_S.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "history": None if self.history is None else self.history.cpu(),
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "last_top1": self.last_top1,
            "last_top5": self.last_top5,
            "teacher_top1": self.teacher_top1,
            "teacher_top5": self.teacher_top5,
            "metrics": self.metrics,
            "elapsed": self.elapsed,
            "rng": distributed.all_gather_objects(_rng_state()),  # one entry per rank
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.generator.load_state_dict(state["generator"])
        self.opt_S.load_state_dict(state["opt_S"])
        self.opt_G.load_state_dict(state["opt_G"])
        for key in ("epoch", "iteration", "best_top1", "best_top5", "last_top1", "last_top5",
                    "teacher_top1", "teacher_top5", "metrics", "elapsed"):
            setattr(self, key, state[key])
        self.history = None if state["history"] is None else state["history"].to(self.device)
        rng = state["rng"]
        if len(rng) != distributed.world_size():
            raise UserError(f"the checkpoint was written by {len(rng)} process(es); resume it with as many "
                            f"(this run has {distributed.world_size()})")
        _set_rng_state(rng[distributed.rank()])

    def save_checkpoint(self) -> str:
        """Write the checkpoint (rank 0); every rank must call this, as it gathers their RNG states."""
        path = os.path.join(self.run_dir, CHECKPOINT)
        state = self.state_dict()
        if self.is_main:
            atomic_save(state, path)
        return path

    def _save_best(self, epochs_done: int) -> None:
        if not self.is_main:
            return
        atomic_save({"format": 1, "options": self.options.to_dict(), "meta": self.meta,
                     "student": self.student.state_dict(), "epoch": epochs_done,
                     "top1": self.best_top1, "top5": self.best_top5},
                    os.path.join(self.run_dir, BEST_STUDENT))

    # ---------------------------------------------------------------------------------- training
    def _sample_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent vectors and uniformly drawn labels for one generator batch."""
        o = self.options
        z = torch.randn(o.batchSize, o.latent_dim, device=self.device)
        return z, torch.randint(0, o.nClasses, (o.batchSize,), device=self.device)

    def _step(self, train_student: bool) -> torch.Tensor:
        o = self.options
        z, labels = self._sample_noise()
        images = self.generator_forward(z, labels)
        with self.bn_stats.capture():
            teacher_logits = self.teacher(images)
        # During warm-up the student gets no backward pass: keep DDP from waiting for one.
        with contextlib.nullcontext() if train_student or not distributed.is_distributed() \
                else self.student_forward.no_sync():
            student_logits = self.student_forward(images)

        bns = self.bn_stats.loss()
        onehot = onehot_loss(teacher_logits, student_logits, labels, o.alpha_ds, o.alpha_as)
        marginal = marginal_loss(teacher_logits, student_logits, o.nClasses, o.lambda_l, o.lambda_u)
        loss_G = marginal + o.beta * onehot + o.gamma * bns
        # The official code runs the student a second time on the detached images for its own loss.
        # The student is in eval mode, so that forward gives these same logits: reuse them and let
        # each loss send gradients only to its own network.
        loss_S = kd_loss(teacher_logits.detach(), student_logits, o.temperature)

        self.opt_G.zero_grad(set_to_none=True)
        loss_G.backward(inputs=self.generator_params, retain_graph=train_student)
        if train_student:
            self.opt_S.zero_grad(set_to_none=True)
            loss_S.backward(inputs=self.student_params)
            self.opt_S.step()
        self.opt_G.step()
        teacher_acc = (teacher_logits.argmax(dim=1) == labels).float().mean()
        return torch.stack([loss_G, marginal, onehot, bns, loss_S, teacher_acc]).detach()

    def _set_learning_rates(self, epoch: int) -> tuple[float, float]:
        o = self.options
        lr_S = learning_rate(o.lr_S, o.lrPolicy_S, o.step_S, o.decayRate_S, epoch)
        lr_G = learning_rate(o.lr_G, o.lrPolicy_G, o.step_G, o.decayRate_G, epoch)
        for group in self.opt_S.param_groups:
            group["lr"] = lr_S
        for group in self.opt_G.param_groups:
            group["lr"] = lr_G
        return lr_S, lr_G

    def _check_finite(self, rows: torch.Tensor, first_iteration: int, epoch: int) -> None:
        """Raise on the first non-finite loss in ``rows`` (on every rank if any rank has one)."""
        bad = (~torch.isfinite(rows)).nonzero().tolist()
        anywhere = distributed.all_reduce(torch.tensor([len(bad)], device=self.device), dist.ReduceOp.MAX)
        if not anywhere.item():
            return
        if not bad:
            raise NonFiniteLossError(f"another process stopped on a non-finite loss at epoch {epoch + 1}")
        row = bad[0][0]
        # Name the term that went first: the total loss_G is non-finite whenever a term is.
        column = min((c for r, c in bad if r == row), key=lambda c: c == LOSS_NAMES.index("loss_G"))
        raise NonFiniteLossError(
            f"loss {LOSS_NAMES[column]} became {rows[row, column].item()} at epoch {epoch + 1}, iteration "
            f"{first_iteration + row + 1}; stopped. The last good checkpoint in {self.run_dir} is kept; "
            f"lower lr_S / lr_G or check the teacher weights")

    def _stop_agreed(self) -> bool:
        """Whether any process received SIGINT/SIGTERM (collective when distributed)."""
        if not distributed.is_distributed():
            return self._stop_signal is not None
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        signum = int(distributed.all_reduce(flag, dist.ReduceOp.MAX).item())
        if signum and self._stop_signal is None:
            self._stop_signal = signum
        return bool(signum)

    def _train_epoch(self, epoch: int) -> dict:
        o = self.options
        lr_S, lr_G = self._set_learning_rates(epoch)
        set_act_tracking(self.student, epoch < o.act_range_epochs)
        self.generator.train()
        train_student = epoch >= o.warmup_epochs
        if self.iteration == 0 or self.history is None:
            self.history = torch.zeros(o.iters_per_epoch, len(LOSS_NAMES), device=self.device)
        progress = _Progress(epoch, o.nEpochs, o.iters_per_epoch, self.iteration)
        checked = self.iteration
        started = time.time()
        single = not distributed.is_distributed()
        for it in range(self.iteration, o.iters_per_epoch):
            self.history[it] = self._step(train_student)
            self.iteration = it + 1
            # Losses come back to the host once per interval. Under torchrun, ranks agree on stopping
            # only at these points, so that they all run the same number of collective steps.
            at_interval = self.iteration % o.log_interval == 0 or self.iteration == o.iters_per_epoch
            if at_interval or (single and self._stop_signal is not None):
                rows = self.history[checked:self.iteration].cpu()
                self._check_finite(rows, checked, epoch)
                checked = self.iteration
                progress.update(self.iteration, dict(zip(LOSS_NAMES, rows.mean(0).tolist())))
                if self._stop_agreed() and self.iteration < o.iters_per_epoch:
                    progress.close()
                    self._interrupt(epoch)
        progress.close()
        means = dict(zip(LOSS_NAMES, self.history.mean(0).tolist()))
        self.iteration, self.history = 0, None
        return {"lr_S": lr_S, "lr_G": lr_G, **means, "train_seconds": time.time() - started}

    def _interrupt(self, epoch: int) -> None:
        self.elapsed += time.time() - self._session_start
        path = self.save_checkpoint()
        name = signal.Signals(self._stop_signal).name
        raise RunInterrupted(
            f"{name} received: stopped at epoch {epoch + 1}, iteration {self.iteration}; checkpoint written to "
            f"{path}. Resume with: python {sys.argv[0]} --resume {self.run_dir}", self._stop_signal)

    def _request_stop(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        logger.warning("%s received: finishing the current step, then writing a checkpoint",
                       signal.Signals(signum).name)
        self._stop_signal = signum

    def calibrate_layerwise_ranges(self) -> None:
        """Fill layer-wise activation ranges from generator images (for runs without training)."""
        if not any(isinstance(m, QuantAct) and m.mode == "layerwise" for m in self.student.modules()):
            return
        logger.info("calibrating layer-wise activation ranges on %d generated batches", self.options.iters_per_epoch)
        set_act_tracking(self.student, True)
        with torch.no_grad():
            for _ in range(self.options.iters_per_epoch):
                z, labels = self._sample_noise()
                self.student_forward(self.generator_forward(z, labels))
        set_act_tracking(self.student, False)

    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        # Evaluation runs in the default layout, so that accuracies equal those of any plain
        # implementation (channels_last convolutions round differently); it only speeds up training.
        model.to(memory_format=torch.contiguous_format)
        try:
            return evaluate(model, self.test_loader, self.device)
        finally:
            model.to(memory_format=self.memory_format)

    def _evaluate_student(self) -> tuple[float, float]:
        set_act_tracking(self.student, False)
        return self._evaluate(self.student)

    def _should_evaluate(self, epoch: int) -> bool:
        o = self.options
        last = epoch == o.nEpochs - 1
        return last or (epoch >= o.eval_start_epoch and (epoch + 1) % o.eval_every == 0)

    def _record_accuracy(self, top1: float, top5: float, epochs_done: int) -> None:
        self.last_top1, self.last_top5 = top1, top5
        if self.best_top1 is None or top1 > self.best_top1:
            self.best_top1, self.best_top5 = top1, top5
            self._save_best(epochs_done)

    def fit(self) -> dict:
        """Run (or continue) training; return the summary."""
        o = self.options
        self._session_start = time.time()
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.teacher_top1 is None:
                self.teacher_top1, self.teacher_top5 = self._evaluate(self.teacher)
                logger.info("teacher %s: top-1 %.2f%%, top-5 %.2f%%", o.network, self.teacher_top1, self.teacher_top5)
            if o.nEpochs == 0:
                self.calibrate_layerwise_ranges()
                self._record_accuracy(*self._evaluate_student(), epochs_done=0)
                logger.info("student W%dA%d (%s, no training): top-1 %.2f%%, top-5 %.2f%%",
                            o.qw, o.qa, o.act_mode, self.last_top1, self.last_top5)
            while self.epoch < o.nEpochs:
                epoch = self.epoch
                epoch_start = time.time()
                record = {"epoch": epoch + 1, **self._train_epoch(epoch)}
                if self._should_evaluate(epoch):
                    self._record_accuracy(*self._evaluate_student(), epochs_done=epoch + 1)
                    record.update(student_top1=self.last_top1, student_top5=self.last_top5)
                record.update(best_top1=self.best_top1, teacher_top1=self.teacher_top1,
                              epoch_seconds=time.time() - epoch_start)
                self.metrics.append(record)
                self._log_epoch(record)
                self.epoch = epoch + 1
                self.elapsed += time.time() - self._session_start
                self._session_start = time.time()
                self.save_checkpoint()
                if self._stop_agreed() and self.epoch < o.nEpochs:
                    self._interrupt(self.epoch)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.metrics_writer is not None:
                self.metrics_writer.close()
        if self.is_main:
            plot_run(self.run_dir)
        self.elapsed += time.time() - self._session_start
        self._session_start = time.time()
        self._check_replicas()
        return self.summary()

    def _check_replicas(self) -> None:
        """Under torchrun, all students must end identical; record one checksum per rank."""
        digest = hashlib.sha256()
        for tensor in self.student.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.meta["student_sha256"] = distributed.all_gather_objects(digest.hexdigest()[:16])
        if len(set(self.meta["student_sha256"])) > 1:
            raise RuntimeError(f"the students of the {distributed.world_size()} processes diverged: "
                               f"{self.meta['student_sha256']}")

    def _log_epoch(self, record: dict) -> None:
        if not self.is_main:
            return
        self.metrics_writer.write(record)
        accuracy = (f"student top-1 {record['student_top1']:.2f}% top-5 {record['student_top5']:.2f}% "
                    f"(best {record['best_top1']:.2f}%)" if "student_top1" in record else "not evaluated")
        logger.info("epoch %d/%d: %s | loss_G %.4f (marginal %.4f, onehot %.4f, bns %.4f) loss_S %.4f | "
                    "teacher acc on generated %.1f%% | lr_S %.2e lr_G %.2e | %.1fs",
                    record["epoch"], self.options.nEpochs, accuracy, record["loss_G"], record["marginal"],
                    record["onehot"], record["bns"], record["loss_S"], 100 * record["teacher_acc"],
                    record["lr_S"], record["lr_G"], record["epoch_seconds"])

    def summary(self) -> dict:
        o = self.options
        return {
            "teacher_top1": self.teacher_top1,
            "teacher_top5": self.teacher_top5,
            "student_top1": self.last_top1,
            "student_top5": self.last_top5,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "epochs": self.epoch,
            "qw": o.qw,
            "qa": o.qa,
            "act_mode": o.act_mode,
            "weight_granularity": o.weight_granularity,
            "network": o.network,
            "dataset": o.dataset,
            "batchSize": o.batchSize,
            "iters_per_epoch": o.iters_per_epoch,
            "world_size": distributed.world_size(),
            **self.meta,
            "seconds": round(self.elapsed, 3),
            "run_dir": os.path.abspath(self.run_dir),
        }


class _Progress:
    """A tqdm bar on a terminal; otherwise plain log lines at each update."""

    def __init__(self, epoch: int, epochs: int, total: int, start: int):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.bar = None
        self.started = time.time()
        self.start = start
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, done: int, losses: dict) -> None:
        shown = {k: f"{v:.4g}" for k, v in losses.items()}
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(shown, refresh=False)
            return
        rate = (done - self.start) / max(time.time() - self.started, 1e-9)
        logger.info("epoch %d/%d iter %d/%d (%.2f it/s) %s", self.epoch + 1, self.epochs, done, self.total,
                    rate, " ".join(f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
