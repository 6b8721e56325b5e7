"""Progress within an epoch: a tqdm bar on a terminal, otherwise one plain log line per update."""

import logging
import sys
import time

__all__ = ["Progress", "log_epoch"]

logger = logging.getLogger("granq")


class Progress:
    """Shows iterations done and the mean of each loss since the last update; ``enabled=False`` shows nothing
    (every process but rank 0)."""

    def __init__(self, epoch: int, epochs: int, total: int, start: int, enabled: bool = True):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.enabled = enabled
        self.bar = None
        self.started = time.time()
        self.start = start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, done: int, losses: dict) -> None:
        if not self.enabled:
            return
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


def log_epoch(record: dict, epochs: int, student_terms=()) -> None:
    """The end-of-epoch line: accuracy, each loss (``student_terms``: the names of the terms of loss_S and any
    filter value, shown after it), the teacher's accuracy on generated images, learning rates."""
    accuracy = (f"student top-1 {record['student_top1']:.2f}% top-5 {record['student_top5']:.2f}% "
                f"(best {record['best_top1']:.2f}%)" if "student_top1" in record else "not evaluated")
    terms = ", ".join(f"{name} {record[name]:.4f}" for name in student_terms)
    logger.info("epoch %d/%d: %s | loss_G %.4f (marginal %.4f, onehot %.4f, bns %.4f) loss_S %.4f%s | "
                "teacher acc on generated %.1f%% | lr_S %.2e lr_G %.2e | %.1fs",
                record["epoch"], epochs, accuracy, record["loss_G"], record["marginal"], record["onehot"],
                record["bns"], record["loss_S"], f" ({terms})" if terms else "", 100 * record["teacher_acc"],
                record["lr_S"], record["lr_G"], record["epoch_seconds"])
