"""Progress within an epoch: a tqdm bar on a terminal, otherwise one plain log line per update."""

import logging
import sys
import time

__all__ = ["Progress", "log_epoch"]

logger = logging.getLogger("granq")


class Progress:
    """Shows iterations done and the mean of each loss since the last update; ``enabled=False`` shows nothing
    (every process but rank 0). ``unit`` names what the iterations belong to: an epoch (``epoch 2/10``), or, where
    given, anything else (a batch of synthetic images)."""

    def __init__(self, epoch: int, epochs: int, total: int, start: int, enabled: bool = True, unit: str = ""):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.name = unit or f"epoch {epoch + 1}/{epochs}"
        self.enabled = enabled
        self.bar = None
        self.started = time.time()
        self.start = start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=self.name, leave=False,
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
        logger.info("%s iter %d/%d (%.2f it/s) %s", self.name, done, self.total, rate,
                    " ".join(f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log_epoch(record: dict, epochs: int, loss_names=()) -> None:
    """The end-of-epoch line: accuracy, the generator's losses (where there is a generator), the student's loss and
    its terms (the ``loss_names`` after ``teacher_acc``: the terms of loss_S and any filter value), the teacher's
    accuracy on the training images, learning rates."""
    accuracy = (f"student top-1 {record['student_top1']:.2f}% top-5 {record['student_top5']:.2f}% "
                f"(best {record['best_top1']:.2f}%)" if "student_top1" in record else "not evaluated")
    names = tuple(loss_names)
    first = names.index("teacher_acc") + 1 if "teacher_acc" in names else len(names)
    terms = ", ".join(f"{name} {record[name]:.4f}" for name in names[first:])
    generator = "loss_G" in record
    losses = (f"loss_G {record['loss_G']:.4f} (marginal {record['marginal']:.4f}, onehot {record['onehot']:.4f}, "
              f"bns {record['bns']:.4f}) " if generator else "")
    rates = f"lr_S {record['lr_S']:.2e}" + (f" lr_G {record['lr_G']:.2e}" if generator else "")
    logger.info("epoch %d/%d: %s | %sloss_S %.4f%s | teacher acc on %s %.1f%% | %s | %.1fs", record["epoch"], epochs,
                accuracy, losses, record["loss_S"], f" ({terms})" if terms else "",
                "generated" if generator else "pool images", 100 * record["teacher_acc"], rates,
                record["epoch_seconds"])
