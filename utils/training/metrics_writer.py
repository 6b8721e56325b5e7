"""Per-epoch metrics: one JSON line per epoch in ``metrics.jsonl``, mirrored to TensorBoard on request."""

from __future__ import annotations

import json
import math
import numbers
import os

from ..system.errors import UserError

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsWriter", "read_metrics", "tensorboard_tag"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_tag(key: str) -> str:
    """TensorBoard tag of a metric key: grouped into accuracy/, lr/, time/ and loss/ sections.

    >>> [tensorboard_tag(k) for k in ("student_top1", "teacher_acc", "lr_S", "epoch_seconds", "bns")]
    ['accuracy/student_top1', 'accuracy/teacher_acc', 'lr/lr_S', 'time/epoch_seconds', 'loss/bns']
    """
    if key.endswith(("_top1", "_top5", "_acc")):
        return f"accuracy/{key}"
    if key.startswith("lr_"):
        return f"lr/{key}"
    if key.endswith("seconds"):
        return f"time/{key}"
    return f"loss/{key}"


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package, which is optional
        raise UserError("tensorboard = true needs the tensorboard package: pip install tensorboard "
                        "(or set tensorboard = false)") from None
    return SummaryWriter


class MetricsWriter:
    """Appends each epoch's record to ``run_dir/metrics.jsonl``; with ``tensorboard`` also writes every
    numeric value as a scalar under ``run_dir/tensorboard`` with the record's ``epoch`` as the step.

    The JSON file is opened per record and flushed at once, so it can be read while a run goes on and
    a resumed run appends to it. A missing tensorboard package raises UserError here, before training.
    """

    def __init__(self, run_dir: str, tensorboard: bool = False):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.tensorboard = None
        if tensorboard:
            self.tensorboard = _summary_writer_class()(log_dir=os.path.join(run_dir, TENSORBOARD_DIR))

    def write(self, record: dict) -> None:
        """Append ``record`` (JSON-serialisable, with an integer ``epoch``)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is None:
            return
        step = record["epoch"]
        for key, value in record.items():
            # bool is a Number too, but a flag is not a curve; NaN would break the plot's axis.
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if math.isfinite(value):
                self.tensorboard.add_scalar(tensorboard_tag(key), value, global_step=step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` by epoch, [] when there is none.

    An epoch recorded twice (a run resumed after a crash between the metrics line and the checkpoint)
    keeps its last record.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    by_epoch = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {number} is not JSON: {line.strip()[:80]!r}") from None
            by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]
