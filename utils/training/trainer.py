"""Zero-shot QAT: a generator learns from the teacher, the fake-quantized student learns from both.

One trainer serves every dataset and network: the config picks the generator, the registry the model.
:meth:`Trainer.step` is one iteration; :meth:`Trainer.fit` runs (or continues) the epochs, evaluates,
writes checkpoints and stops cleanly when asked to.
"""

import contextlib
import logging
import os
import sys
import time

import torch
import torch.nn as nn

from quantization_utils import has_tracked_ranges, quantize_model, set_act_tracking

from ..system import distributed
from ..system.devices import resnet_memory_format
from ..system.stopping import RunInterrupted, StopRequest
from . import checkpoints
from .evaluate import evaluate_frozen
from .generator import build_generator, noise_generator
from .graphs import may_capture
from .losses import (
    BNStatistics,
    FeatureCapture,
    build_student_losses,
    check_finite,
    generator_loss,
    make_input_filter,
    student_loss,
)
from .metrics_writer import MetricsWriter
from .optim import build_optimizers, device_scalar, set_learning_rates, student_progress
from .pools import POOL_LOSS_NAMES, PoolImages
from .progress import Progress, log_epoch
from .state import TrainingState

__all__ = ["LOSS_NAMES", "Trainer"]

logger = logging.getLogger("granq")

# Per-iteration values recorded on the device, read back once per log interval: these, then each term of student_losses
# under its name (Trainer.loss_names), then, with an input filter, the share of the images' energy it keeps.
LOSS_NAMES = ("loss_G", "marginal", "onehot", "bns", "loss_S", "teacher_acc")


class Trainer:
    """Owns the student, the generator (or the pool), their optimizers and the run state; writes into ``run_dir``."""

    def __init__(self, options, teacher: nn.Module, test_loader, device: torch.device, run_dir: str, meta: dict,
                 pool=None):
        self.options, self.device, self.run_dir = options, device, run_dir
        self.meta = meta  # recorded in checkpoints and the summary: id, seed, teacher weights source
        self.test_loader = test_loader
        self.memory_format = resnet_memory_format(device)
        self.teacher = teacher.to(device, memory_format=self.memory_format).eval()
        self.student = self.build_student(teacher).to(device, memory_format=self.memory_format).eval()
        self.student.requires_grad_(True)
        self.pool = PoolImages(pool, options, device) if options.image_source == "pool" else None  # no generator then
        self.generator = None if self.pool else build_generator(options).to(device).train()
        self.student_params = list(self.student.parameters())
        self.generator_params = [] if self.pool else list(self.generator.parameters())
        self.is_main = distributed.rank() == 0
        # Forward through DDP under torchrun; checkpoints always hold the unwrapped modules.
        self.student_forward = distributed.wrap(self.student, device)
        self.generator_forward = distributed.wrap(self.generator, device)
        self.opt_S = self.opt_G = None  # built by use_capturable, for capture or for eager iterations
        self.use_capturable(may_capture(options.cuda_graph, device))
        self.bn_stats = BNStatistics(self.teacher)
        # The training noise (latents and labels, or a pool's draws) has a stream of its own, so that nothing else a
        # run does (evaluating, its loader's workers, resuming) can move it.
        self.noise = noise_generator(meta.get("seed", 0), distributed.rank(), device)  # benchmarks pass no seed
        self.graphed_step = None  # what train_epoch calls instead of step: its CUDA graph (graphs.use_cuda_graphs)
        # The student's loss: the registered terms of student_losses; hooks only for the layers they read.
        self.student_losses = build_student_losses(options, self.teacher)
        self.features = FeatureCapture({"teacher": self.teacher, "student": self.student},
                                       [layer for _, term in self.student_losses for layer in term.layer_names])
        self.input_filter = make_input_filter(options.student_input_filter)
        self.records_filter = options.student_input_filter != "none"
        self.loss_names = ((POOL_LOSS_NAMES if self.pool else LOSS_NAMES) + tuple(n for n, _ in self.student_losses)
                           + ((f"{options.student_input_filter}_kept",) if self.records_filter else ()))
        self.epoch = self.iteration = 0  # the next epoch to run, and the next iteration within it
        self.history = None  # per-iteration losses of the current epoch, on the device
        self.best_top1 = self.best_top5 = self.last_top1 = self.last_top5 = None
        self.teacher_top1 = self.teacher_top5 = None
        self.metrics: list[dict] = []
        self.elapsed = 0.0
        self.stop = StopRequest()
        # Rank 0 writes metrics.jsonl (and TensorBoard scalars); a missing tensorboard fails here, early.
        self.metrics_writer = MetricsWriter(run_dir, options.tensorboard) if self.is_main else None
        self.training_state = TrainingState(self)  # what checkpoints and the CUDA-graph self-check save

    def build_student(self, teacher: nn.Module) -> nn.Module:
        """The fake-quantized copy of the teacher that training distils into (benchmarks override it)."""
        return quantize_model(teacher, self.options.student_spec())

    def use_capturable(self, capturable: bool) -> None:
        """Optimizers (their state carried over) and progress value for iterations captured as a CUDA graph, or
        for eager ones (:func:`.optim.build_optimizers`)."""
        self.capturable = capturable
        self.opt_S, self.opt_G = build_optimizers(self.options, self.student_params, self.generator_params,
                                                  capturable, previous=(self.opt_S, self.opt_G))
        self.progress_tensor = device_scalar(self.device) if capturable else None  # set in set_learning_rates

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """``checkpoint.pt``'s record: options, metadata and :attr:`training_state` (gathers every rank's RNG)."""
        state = self.training_state.state_dict()
        return checkpoints.student_record(self.options.to_dict(), self.meta, state.pop("student"), **state)

    def load_state_dict(self, state: dict) -> None:
        self.training_state.load_state_dict(state)

    def save_checkpoint(self) -> str:
        """Write ``checkpoint.pt`` (rank 0); every rank must call this, as it gathers their RNG states."""
        path = os.path.join(self.run_dir, checkpoints.CHECKPOINT)
        state = self.state_dict()
        if self.is_main:
            checkpoints.save_run_file(state, path, self.run_dir)
        return path

    # ---------------------------------------------------------------------------------- training
    def sample_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent vectors and uniformly drawn labels for one generator batch."""
        o = self.options
        z = torch.randn(o.batchSize, o.latent_dim, device=self.device, generator=self.noise)
        return z, torch.randint(0, o.nClasses, (o.batchSize,), device=self.device, generator=self.noise)

    def step(self, train_student: bool = True) -> torch.Tensor:
        """One iteration: update the generator, and the student unless ``train_student`` is False (warm-up).

        Returns the values named by ``self.loss_names``, on the device (reading them would wait for it).
        """
        if self.pool is not None:  # no generator: the pool's iteration
            return self.pool.step(self, train_student)
        o = self.options
        z, labels = self.sample_noise()
        images = self.generator_forward(z, labels)
        # What the student distils on: ``images`` itself unless an input filter changes them.
        student_images = self.input_filter(images, o)
        unfiltered = student_images is images
        with self.bn_stats.capture(), self.features.capture(enabled=unfiltered):
            teacher_logits = self.teacher(images)
            student_logits = self._student(images, sync=train_student and unfiltered)

        bns = self.bn_stats.loss()
        loss_G, marginal, onehot = generator_loss(o, teacher_logits, student_logits, labels, bns)
        teacher_acc = (teacher_logits.argmax(dim=1) == labels).float().mean()
        # The official code runs the student a second time on the detached images for its own loss.
        # The student is in eval mode, so that forward gives these same logits: reuse them and let
        # each loss send gradients only to its own network. Filtered images need a pass of their own.
        if not unfiltered:
            with self.features.capture():
                teacher_logits = self.teacher(student_images)
                student_logits = self._student(student_images, sync=train_student)
        terms, loss_S = student_loss(self.student_losses, self.features.take(), teacher_logits, student_logits, labels,
                                     self.student_progress())

        self.opt_G.zero_grad(set_to_none=True)
        loss_G.backward(inputs=self.generator_params, retain_graph=train_student)
        if train_student:
            self.opt_S.zero_grad(set_to_none=True)
            loss_S.backward(inputs=self.student_params)
            self.opt_S.step()
        self.opt_G.step()
        kept = [student_images.square().sum() / images.square().sum()] if self.records_filter else []
        return torch.stack([loss_G, marginal, onehot, bns, loss_S, teacher_acc, *terms, *kept]).detach()

    def _student(self, images: torch.Tensor, sync: bool) -> torch.Tensor:
        """The student's logits. Under torchrun only a forward whose loss trains the student may let DDP wait
        for a backward pass: the others (warm-up, the generator's pass beside a filtered one) run in no_sync."""
        with contextlib.nullcontext() if sync or not distributed.is_distributed() else self.student_forward.no_sync():
            return self.student_forward(images)

    def student_progress(self) -> float | torch.Tensor:
        """Share of the student's training done now (:func:`.optim.student_progress`); where capturable, the tensor."""
        shared = self.progress_tensor
        return student_progress(self.options, self.epoch, self.iteration) if shared is None else shared

    def set_learning_rates(self, epoch: int, iteration: int = 0) -> tuple[float, float]:
        """Set both learning rates (on CUDA the progress too) for ``iteration`` of ``epoch``; return (lr_S, lr_G)."""
        return set_learning_rates(self.options, self.opt_S, self.opt_G, epoch, iteration, self.progress_tensor)

    def train_epoch(self, epoch: int) -> dict:
        """Run epoch ``epoch`` from ``self.iteration`` on; return its metrics record (means of the losses)."""
        o = self.options
        lr_S, lr_G = self.set_learning_rates(epoch, self.iteration)
        set_act_tracking(self.student, epoch < o.act_range_epochs)
        if self.iteration == 0 or self.history is None:
            self.history = torch.zeros(o.iters_per_epoch, len(self.loss_names), device=self.device)
        progress = Progress(epoch, o.nEpochs, o.iters_per_epoch, self.iteration, enabled=self.is_main)
        checked, started = self.iteration, time.time()
        single = not distributed.is_distributed()
        for it in range(self.iteration, o.iters_per_epoch):
            self.set_learning_rates(epoch, it)  # constant within an epoch but for cosine schedules
            self.history[it] = (self.graphed_step or self.step)(train_student=epoch >= o.warmup_epochs)
            self.iteration = it + 1
            # Losses come back to the host once per interval. Under torchrun, ranks agree on stopping
            # only at these points, so that they all run the same number of collective steps.
            at_interval = self.iteration % o.log_interval == 0 or self.iteration == o.iters_per_epoch
            if at_interval or (single and self.stop.signum is not None):
                rows = self.history[checked:self.iteration].cpu()
                check_finite(rows, self.loss_names, checked, epoch, self.device, self.run_dir)
                checked = self.iteration
                progress.update(self.iteration, dict(zip(self.loss_names, rows.mean(0).tolist())))
                if self.stop.agreed(self.device) and self.iteration < o.iters_per_epoch:
                    progress.close()
                    self._interrupt(epoch)
        progress.close()
        means = dict(zip(self.loss_names, self.history.mean(0).tolist()))
        self.iteration, self.history = 0, None
        return {"lr_S": lr_S, "lr_G": lr_G, **means, "train_seconds": time.time() - started}

    def _interrupt(self, epoch: int) -> None:
        self._add_elapsed()
        path = self.save_checkpoint()
        raise RunInterrupted(
            f"{self.stop.name} received: stopped at epoch {epoch + 1}, iteration {self.iteration}; checkpoint "
            f"written to {path}. Resume with: python {sys.argv[0]} --resume {self.run_dir}", self.stop.signum)

    def calibrate_act_ranges(self) -> None:
        """Fill tracked activation ranges from generator images or the pool's (ZeroQ) in runs without training."""
        if not has_tracked_ranges(self.student):
            return
        logger.info("calibrating %s activation ranges on %s images", self.options.act_mode, self.options.image_source)
        set_act_tracking(self.student, True)
        with torch.no_grad():  # the pool's batches, or iters_per_epoch generated ones
            for batch in self.pool.calibration_batches() if self.pool else range(self.options.iters_per_epoch):
                self.student_forward(batch if self.pool else self.generator_forward(*self.sample_noise()))
        set_act_tracking(self.student, False)

    # -------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """Top-1/top-5 of ``model`` (the teacher or the student, ranges frozen) on the test set."""
        return evaluate_frozen(model, self.test_loader, self.device, self.memory_format)

    def _evaluate_student(self, epochs_done: int) -> None:
        self.last_top1, self.last_top5 = self.evaluate(self.student)
        if self.best_top1 is None or self.last_top1 > self.best_top1:
            self.best_top1, self.best_top5 = self.last_top1, self.last_top5
            if self.is_main:
                checkpoints.save_best_student(self, epochs_done)

    def _add_elapsed(self) -> None:
        now = time.time()
        self.elapsed, self._session_start = self.elapsed + now - self._session_start, now

    def fit(self) -> dict:
        """Run (or continue) training; return the summary."""
        o = self.options
        self._session_start = time.time()
        try:
            with self.stop.handling_signals():
                if self.teacher_top1 is None:
                    self.teacher_top1, self.teacher_top5 = self.evaluate(self.teacher)
                    logger.info("teacher %s: top-1 %.2f%%, top-5 %.2f%%", o.network, self.teacher_top1,
                                self.teacher_top5)
                if o.nEpochs == 0:
                    self.calibrate_act_ranges()
                    self._evaluate_student(epochs_done=0)
                    logger.info("student W%dA%d (%s, no training): top-1 %.2f%%, top-5 %.2f%%",
                                o.qw, o.qa, o.act_mode, self.last_top1, self.last_top5)
                while self.epoch < o.nEpochs:
                    self._fit_epoch(self.epoch)
                    if self.stop.agreed(self.device) and self.epoch < o.nEpochs:
                        self._interrupt(self.epoch)
        finally:
            if self.metrics_writer is not None:
                self.metrics_writer.close()
        self._add_elapsed()
        self.meta["student_sha256"] = distributed.replica_checksums(self.student)
        return self.summary()

    def _fit_epoch(self, epoch: int) -> None:
        o = self.options
        epoch_start = time.time()
        record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
        if o.evaluates_after(epoch):
            self._evaluate_student(epochs_done=epoch + 1)
            record.update(student_top1=self.last_top1, student_top5=self.last_top5)
        record.update(best_top1=self.best_top1, teacher_top1=self.teacher_top1,
                      epoch_seconds=time.time() - epoch_start)
        self.metrics.append(record)
        if self.is_main:
            self.metrics_writer.write(record)
            log_epoch(record, o.nEpochs, self.loss_names)
        self.epoch = epoch + 1
        self._add_elapsed()
        self.save_checkpoint()

    def summary(self) -> dict:
        """What ``summary.json`` records of the run (:func:`.checkpoints.run_summary`)."""
        return checkpoints.run_summary(self)
