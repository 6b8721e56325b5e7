"""A cell of a plan: its folder, its state (done, to resume, to run), its log, and starting its run.

Both launchers build on this module, the local one (:mod:`.local`) and the SLURM one (:mod:`.slurm`), and
neither imports the other. A cell's folder is its run's ``save_path``: the run makes its own timestamped directory
inside, and ``cell.log`` there collects the command's output over every attempt. Its lock, ``cell.lock`` in the
folder (:mod:`utils.system.locks`), is held by whoever runs it.
"""

from __future__ import annotations

import datetime
import glob
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass

from ..reports.results import SUMMARY_FILE
from ..system.locks import CELL_LOCK, lock_fd
from ..training.checkpoints import CHECKPOINT

__all__ = ["CELL_LOG", "ROOT", "Cell", "cell_state", "last_line", "open_cell_log", "short_path", "start_run"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CELL_LOG = "cell.log"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Cell:
    name: str
    config: str
    bits: int
    act_mode: str
    seed: int
    folder: str  # the run's save_path
    main_py: str
    overrides: tuple[str, ...]  # every --set of a fresh run
    variant: str = ""

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, CELL_LOG)

    @property
    def lock_path(self) -> str:
        return os.path.join(self.folder, CELL_LOCK)

    def options(self):
        """The cell's config as a fresh run of it reads it."""
        from ..runs.config import load_options

        return load_options(self.config, self.overrides, qw=self.bits, qa=self.bits)

    def command(self, python: str) -> tuple[str, list[str]]:
        """What to do now (``"done"``, ``"resume"`` or ``"run"``, see :func:`cell_state`) and the command
        that does it (empty when done)."""
        state, run_dir = cell_state(self)
        if state == "done":
            return state, []
        return state, self.fresh_command(python) if state == "run" else self.resume_command(python, run_dir)

    def fresh_command(self, python: str) -> list[str]:
        command = [python, short_path(self.main_py), "--conf_path", short_path(self.config), "--id", str(self.seed),
                   "--qw", str(self.bits), "--qa", str(self.bits)]
        for override in self.overrides:
            command += ["--set", override]
        return command

    def resume_command(self, python: str, run_dir: str) -> list[str]:
        # The run's own config (in its checkpoint) applies; --set is not given, as main.py would refuse a change.
        return [python, short_path(self.main_py), "--resume", run_dir]


def short_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def cell_state(cell: Cell) -> tuple[str, str | None]:
    """``("done", run_dir)``, ``("resume", run_dir)`` or ``("run", None)``; see the module docstring."""
    finished = sorted(glob.glob(os.path.join(glob.escape(cell.folder), "*", SUMMARY_FILE)))
    if finished:
        return "done", os.path.dirname(finished[0])
    checkpoints = glob.glob(os.path.join(glob.escape(cell.folder), "*", CHECKPOINT))
    if checkpoints:
        return "resume", os.path.dirname(max(checkpoints, key=os.path.getmtime))
    return "run", None


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _die_with_parent(ignore_signals=()):
    """A function for ``Popen(preexec_fn=...)``: on Linux the child gets SIGTERM when the process that started
    it ends, however it ends (``PR_SET_PDEATHSIG``), so that a run never outlives its launcher unnoticed: it
    writes its checkpoint and stops, and the next call resumes it. ``ignore_signals`` are ignored by the child."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it

    def setup():
        for signum in ignore_signals:
            signal.signal(signum, signal.SIG_IGN)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent ended before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


def start_run(command: list[str], log, env: dict, lock=None, ignore_signals=()) -> subprocess.Popen:
    """Start a cell's run with its output appended to ``log``, in a session of its own: a Ctrl-C at the
    terminal reaches the launcher only, which then sends each run exactly one SIGTERM (a second signal would
    stop a run before it writes its checkpoint). The run also gets SIGTERM when the launcher dies (Linux;
    elsewhere it runs on to its end, see :func:`_die_with_parent`) and inherits the cell's ``lock``, so that
    the cell stays locked until the run has ended even when the launcher ends first."""
    posix = os.name == "posix"
    fd = lock_fd(lock) if lock is not None and posix else None
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent(ignore_signals) if posix else None,
                                pass_fds=(fd,) if fd is not None else ())
    finally:
        if fd is not None:
            os.close(fd)


def open_cell_log(cell: Cell, command: list[str], env: dict | None = None):
    """``cell.log``, opened for appending, with a line that dates and shows the command and the ``env`` it gets
    beyond this process's environment."""
    os.makedirs(cell.folder, exist_ok=True)
    log = open(cell.log_path, "a")
    extra = "".join(f"{key}={value} " for key, value in (env or {}).items())
    log.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {extra}{shlex.join(command)}\n")
    log.flush()
    return log
