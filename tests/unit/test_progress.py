"""Progress output: a bar on a terminal, log lines otherwise, and nothing at all from ranks other than 0."""

import io
import logging
import sys

import pytest

import utils.training.trainer as trainer_module
from utils.training.progress import Progress

from .test_trainer_step import make_trainer


class Terminal(io.StringIO):
    def isatty(self):
        return True


def as_terminal(monkeypatch) -> Terminal:
    """stderr as a terminal; what is drawn on it is its value. Called in the test itself: pytest's capture
    replaces sys.stderr again between a fixture's setup and the test."""
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def test_a_terminal_gets_a_bar(monkeypatch):
    terminal = as_terminal(monkeypatch)
    progress = Progress(0, 2, 10, 0)
    progress.update(5, {"loss_S": 1.0})
    progress.close()
    assert "epoch 1/2" in terminal.getvalue()


def test_disabled_progress_shows_nothing(monkeypatch, caplog):
    terminal = as_terminal(monkeypatch)
    caplog.set_level(logging.INFO, logger="granq")
    progress = Progress(0, 2, 10, 0, enabled=False)
    progress.update(5, {"loss_S": 1.0})
    progress.close()
    assert terminal.getvalue() == "" and caplog.records == []


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_draws_the_bar(rank, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.distributed, "rank", lambda: rank)
    trainer = make_trainer(tmp_path, "log_interval=1")
    terminal = as_terminal(monkeypatch)
    assert trainer.is_main == (rank == 0)
    trainer.train_epoch(0)
    assert ("epoch 1/" in terminal.getvalue()) == (rank == 0)
