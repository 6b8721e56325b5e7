"""The local launcher: run a plan's cells on this machine, ``--jobs`` at a time, each under its cell's lock."""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ..reports.results import SUMMARY_FILE, load_summaries
from ..system.locks import PROBE_WAIT_S, try_lock
from .cells import Cell, cell_state, last_line, open_cell_log, start_run

__all__ = ["Task", "claim", "clock", "cpu_threads", "run_cells", "say", "skip_locked"]


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


@dataclass
class Task:
    """A cell to start, run with ``python``. What it does (``action``, ``command``) is decided when it starts,
    under the cell's lock: another call may have run the cell meanwhile."""
    cell: Cell
    python: str
    action: str = ""  # "run" or "resume"
    command: list[str] = dataclasses.field(default_factory=list)
    outcome: str = "pending"  # then "done", "failed", "interrupted", "locked" (running elsewhere) or "skipped"
    detail: str = ""


@dataclass
class _Running:
    task: Task
    process: subprocess.Popen
    log: object
    lock: object  # the cell's FileLock, held until the run ends
    started: float
    slot: int
    number: str  # "i/n", for the progress lines


def say(text: str, start: float) -> None:
    print(f"[{clock(time.time() - start)}] {text}", flush=True)


def skip_locked(cell: Cell) -> str:
    return f"skip   {cell.name}: running in another call (its lock {cell.lock_path} is held)"


def claim(task: Task):
    """The cell's lock, with ``task.action`` and ``task.command`` set from the cell's state now; None when
    another process holds the lock (``task.outcome = "locked"``) or the cell finished meanwhile ("skipped"),
    the line to print then in ``task.detail``. Release the lock once the run has ended."""
    lock = try_lock(task.cell.lock_path, PROBE_WAIT_S)
    if lock is None:
        task.outcome, task.detail = "locked", skip_locked(task.cell)
        return None
    task.action, task.command = task.cell.command(task.python)
    if task.action == "done":
        lock.release()
        task.outcome, task.detail = "skipped", f"skip   {task.cell.name}: done meanwhile by another call"
        return None
    return lock


def cpu_threads(jobs: int, gpus=()) -> int | None:
    """Intra-op threads (``OMP_NUM_THREADS``) of each run when ``jobs`` cells share this machine's CPUs: its cores
    divided among them, at least 1; None (PyTorch's default, every core) for one job, with ``gpus`` to spread over,
    or when the caller set ``OMP_NUM_THREADS`` itself.

    Small CPU models scale poorly over threads: on 2 AMD EPYC cores two ResNet-20 W3A3 cells at batch 16 with one
    thread each train 1.3-2x as many iterations per second in all as one cell with two threads (docs/tools.md,
    benchmarks/cpu_jobs.py).
    """
    if jobs <= 1 or gpus or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def _start(task: Task, lock, number: str, gpu: str | None, threads: int | None, slot: int,
           start: float) -> _Running:
    extra = {}
    if gpu is not None:
        extra["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        extra["OMP_NUM_THREADS"] = str(threads)
    log = open_cell_log(task.cell, task.command, extra)
    env = {**os.environ, **extra}
    process = start_run(task.command, log, env, lock)
    where = f" on GPU {gpu}" if gpu is not None else ""
    what = f" (resume {task.command[-1]})" if task.action == "resume" else ""
    say(f"start  {number} {task.cell.name}{where}{what}", start)
    return _Running(task, process, log, lock, time.time(), slot, number)


def _finish(running: _Running, start: float) -> None:
    running.log.close()
    running.lock.release()
    task, code, number = running.task, running.process.returncode, running.number
    took = clock(time.time() - running.started)
    state, run_dir = cell_state(task.cell)
    if code == 0 and state == "done":
        task.outcome = "done"
        summary = load_summaries([run_dir])[0]
        top1 = summary.get("student_top1")
        task.detail = f"student_top1 {top1:.2f}" if top1 is not None else "no student_top1"
        say(f"done   {number} {task.cell.name} in {took}: {task.detail}", start)
    elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        task.outcome = "interrupted"
        say(f"stopped {number} {task.cell.name} after {took}: interrupted, rerun to resume; log {task.cell.log_path}",
             start)
    else:
        task.outcome = "failed"
        reason = f"exit code {code}" if code != 0 else f"exit code 0 but no {SUMMARY_FILE}"
        last = last_line(task.cell.log_path)
        task.detail = f"{reason}; log {task.cell.log_path}" + (f"; last line: {last}" if last else "")
        say(f"FAILED {number} {task.cell.name} after {took}: {task.detail}", start)


def run_cells(tasks: list[Task], jobs: int = 1, gpus=(), start: float | None = None) -> bool:
    """Run ``tasks``, ``jobs`` at a time, each with one of ``gpus`` (cycled over the job slots) or none, and
    without GPUs with its share of the CPU cores (:func:`cpu_threads`); set each task's outcome. A task whose cell
    another process holds (or finished) when its turn comes is skipped, with one line. Returns False when
    interrupted (Ctrl-C or SIGTERM): the runs then got one SIGTERM each, wrote their checkpoints and were waited for."""
    start = time.time() if start is None else start
    slots = [gpus[i % len(gpus)] for i in range(jobs)] if gpus else [None] * jobs
    threads = cpu_threads(jobs, gpus)
    free = list(range(jobs))
    pending = list(enumerate(tasks, 1))
    running: list[_Running] = []
    width = len(str(len(tasks)))

    try:
        while pending or running:
            while pending and free:
                i, task = pending.pop(0)
                lock = claim(task)
                if lock is None:
                    say(task.detail, start)
                    continue
                slot = free.pop(0)
                running.append(_start(task, lock, f"{i:{width}d}/{len(tasks)}", slots[slot], threads, slot, start))
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                free.append(r.slot)
                free.sort()
                _finish(r, start)
            if running:
                time.sleep(0.2)
        return True
    except KeyboardInterrupt:
        say(f"interrupted: stopping {len(running)} run(s); each writes a checkpoint (Ctrl-C again: stop at once)",
             start)
        for r in running:
            r.process.send_signal(signal.SIGTERM)
        while running:
            try:
                for r in [r for r in running if r.process.poll() is not None]:
                    running.remove(r)
                    _finish(r, start)
                time.sleep(0.2)
            except KeyboardInterrupt:
                for r in running:
                    r.process.send_signal(signal.SIGTERM)
        return False
