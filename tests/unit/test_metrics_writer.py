import doctest
import json
import os
import sys

import pytest

import utils.training.metrics_writer
from utils.system.errors import UserError
from utils.training.metrics_writer import MetricsWriter, read_metrics

RECORDS = [
    {"epoch": 1, "lr_S": 1e-4, "loss_G": 2.5, "loss_S": -0.25, "teacher_acc": 0.5, "best_top1": None,
     "epoch_seconds": 3.0},
    {"epoch": 2, "lr_S": 1e-4, "loss_G": 2.0, "loss_S": -0.5, "teacher_acc": 0.75, "student_top1": 61.5,
     "best_top1": 61.5, "epoch_seconds": 2.5, "note": "text is kept in JSON only"},
]


def test_records_are_appended_as_json_lines(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(RECORDS[0])
    with MetricsWriter(str(tmp_path)) as writer:  # a resumed run appends
        writer.write(RECORDS[1])
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == RECORDS
    assert not os.path.exists(tmp_path / "tensorboard")


def test_read_metrics_keeps_the_last_record_of_an_epoch(tmp_path):
    assert read_metrics(str(tmp_path)) == []
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for record in ({"epoch": 2, "loss_G": 9.0}, {"epoch": 1, "loss_G": 1.0}, {"epoch": 2, "loss_G": 2.0}):
            f.write(json.dumps(record) + "\n")
    assert read_metrics(str(tmp_path)) == [{"epoch": 1, "loss_G": 1.0}, {"epoch": 2, "loss_G": 2.0}]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("{broken\n")
    with pytest.raises(UserError, match="line 4 is not JSON"):
        read_metrics(str(tmp_path))


def test_tensorboard_scalars_per_epoch(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with MetricsWriter(str(tmp_path), tensorboard=True) as writer:
        for record in RECORDS:
            writer.write(record)
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"lr/lr_S", "loss/loss_G", "loss/loss_S", "accuracy/teacher_acc", "accuracy/student_top1",
                    "accuracy/best_top1", "time/epoch_seconds"}
    assert [(e.step, e.value) for e in events.Scalars("loss/loss_G")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("accuracy/student_top1")] == [(2, 61.5)]
    assert [e.step for e in events.Scalars("accuracy/best_top1")] == [2]  # None is not a value


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install tensorboard"):
        MetricsWriter(str(tmp_path), tensorboard=True)
    MetricsWriter(str(tmp_path), tensorboard=False).close()


def test_doctests():
    # utils/ is not among pytest's doctest paths; these examples are part of the documentation.
    assert doctest.testmod(utils.training.metrics_writer).failed == 0
