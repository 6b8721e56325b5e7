"""Cells as SLURM jobs, through submitit: ``tools/reproduce.py --launcher slurm``.

Each cell that has no result and no job queued or running becomes one job; its submitit files go to
``<cell>/submitit/`` and its job ids to ``<cell>/slurm_jobs.jsonl``. The job runs the same command as the local
launcher (``main.py``, fresh or ``--resume RUN_DIR``, output appended to ``cell.log``), and its first task holds
the cell's lock (``cell.lock``) while it runs. A cell with more than one GPU gets one task per GPU; each task runs
one process of the run with the variables torchrun would set (:func:`torchrun_env`).

Time limit and preemption: SLURM sends SIGUSR2 (submitit's ``--signal``, 90 s before the time limit, and after
SIGTERM at a preemption) to every process of the job. The runs ignore it; submitit calls
:meth:`CellJob.checkpoint`, which makes the run write its checkpoint (one SIGTERM, unless SLURM's own SIGTERM
already reached it) and waits for it to end; submitit then requeues the job, which resumes the run.

submitit is optional: only this launcher imports it, and says how to install it when it is missing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass

from ..system.errors import UserError
from ..system.locks import PROBE_WAIT_S, held_elsewhere, try_lock
from .cells import ROOT, Cell, cell_state, last_line, open_cell_log, start_run

__all__ = ["JOBS_FILE", "SLURM_KEYS", "CellJob", "SlurmSettings", "cell_status", "job_states", "parse_time",
           "print_status", "require_submitit", "slurm_settings", "submit", "torchrun_env"]

JOBS_FILE = "slurm_jobs.jsonl"  # in the cell's folder: one JSON line per job submitted for the cell
SUBMITIT_FOLDER = "submitit"  # in the cell's folder: submitit's pickles and each job's stdout/stderr
# key -> (type, what it holds); the plan's `slurm` block and the flags of the same names
SLURM_KEYS = {
    "partition": (str, "the partition (sbatch --partition); empty: the cluster's default"),
    "time": (str, "the time limit of each job, minutes or [D-]HH:MM[:SS] (sbatch --time)"),
    "gpus_per_cell": (int, "GPUs of each cell, on one node: one task, and so one process of the run, per GPU; "
                           "0: a CPU job"),
    "cpus_per_gpu": (int, "CPUs of each task (sbatch --cpus-per-task): evaluation workers and more"),
    "account": (str, "the account to charge (sbatch --account); empty: your default"),
}
LOCK_WAIT_S = 60  # a job waits this long for the cell's lock: the call that submitted it holds it for a moment
STOP_WAIT_S = 120  # after SLURM's SIGTERM, how long a job waits for the signal that requeues it
MAX_TIMEOUTS = 50  # times a job is requeued at its time limit (preemptions do not count) before it gives up
SIGNAL_SETTLE_S = 1.0  # at a preemption SLURM's SIGTERM and the requeue signal come together
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESIZING")
RUNNING_STATES = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING")


@dataclass(frozen=True)
class SlurmSettings:
    partition: str = ""
    time: str = "24:00:00"
    gpus_per_cell: int = 1
    cpus_per_gpu: int = 8
    account: str = ""

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time)

    def describe(self) -> str:
        where = f"partition {self.partition}" if self.partition else "the default partition"
        return (f"{where}, time limit {self.time}, {self.gpus_per_cell} GPU(s) and {self.cpus_per_gpu} CPU(s) per "
                f"GPU per cell" + (f", account {self.account}" if self.account else ""))


def parse_time(text) -> int:
    """A SLURM time limit in whole minutes (at least 1): ``90``, ``"90"``, ``"1:30:00"``, ``"2-00:00:00"``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match or isinstance(text, bool):
        raise UserError(f"time {text!r}: give minutes (e.g. 90) or [D-]HH:MM[:SS] (e.g. 24:00:00)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if second is None and days is None:
        minutes = first
    else:
        hours, mins, secs = first, second or 0, third or 0
        minutes = (days or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes < 1:
        raise UserError(f"time {text!r}: give at least one minute")
    return minutes


def slurm_settings(block: dict | None, where: str, **flags) -> SlurmSettings:
    """The settings of a plan's ``slurm`` block (``where`` names it in errors), with ``flags`` that are not None
    on top; every value checked."""
    values = dict(block or {})
    unknown = [key for key in values if key not in SLURM_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key(s): {', '.join(unknown)}. Valid keys: {', '.join(SLURM_KEYS)}")
    values.update({key: value for key, value in flags.items() if value is not None})
    for key, value in values.items():
        kind = SLURM_KEYS[key][0]
        if key == "time" and isinstance(value, int) and not isinstance(value, bool):
            value = values[key] = str(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: {key} must be {'a string' if kind is str else 'an integer'}, got {value!r}")
    settings = SlurmSettings(**values)
    parse_time(settings.time)
    if settings.gpus_per_cell < 0 or settings.cpus_per_gpu < 1:
        raise UserError(f"{where}: gpus_per_cell must be 0 or more and cpus_per_gpu 1 or more")
    return settings


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher slurm needs the submitit package: pip install submitit") from None
    return submitit


def torchrun_env(job) -> dict[str, str]:
    """The variables torchrun would set for this task of a job of several tasks, so that
    :func:`utils.system.distributed.init_from_env` joins the job's process group unchanged: rank, world size and
    local rank from SLURM's ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``, the rendezvous at the first
    host of ``SLURM_JOB_NODELIST`` on a port drawn from the job id. ``job`` is submitit's JobEnvironment, which
    reads those variables. Empty for a job of one task."""
    if job.num_tasks <= 1:
        return {}
    digits = "".join(c for c in str(job.job_id) if c.isdigit()) or "0"
    return {"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // max(1, job.num_nodes)), "GROUP_RANK": str(job.node),
            "MASTER_ADDR": job.hostnames[0], "MASTER_PORT": str(20000 + int(digits) % 20000)}


def _exited(pid: int, wait: bool = False) -> bool:
    """Whether child ``pid`` has ended, without reaping it (its Popen does that); ``wait``: block until it has.
    Safe in a signal handler that interrupted ``Popen.poll``."""
    flags = os.WEXITED | os.WNOWAIT | (0 if wait else os.WNOHANG)
    try:
        return os.waitid(os.P_PID, pid, flags) is not None
    except ChildProcessError:  # already reaped
        return True


class CellJob:
    """What each task of a cell's job runs (submitit pickles it): the cell's command as the local launcher runs
    it. :meth:`checkpoint` is submitit's hook for the time limit and preemption."""

    def __init__(self, cell: Cell, python: str):
        self.cell, self.python = cell, python
        self._child = None
        self._sigterm = False

    def __getstate__(self):
        return {"cell": self.cell, "python": self.python}

    def __setstate__(self, state):
        self.__init__(state["cell"], state["python"])

    def _note_sigterm(self, signum, frame) -> None:
        # SLURM sends SIGTERM to every process of the job at once, so the run got one too: it is stopping.
        self._sigterm = True
        print(f"cell {self.cell.name}: SIGTERM received; the run writes its checkpoint", flush=True)

    def __call__(self):
        submitit = require_submitit()
        job = submitit.JobEnvironment()
        cell, lock = self.cell, None
        if job.global_rank == 0:
            lock = try_lock(cell.lock_path, timeout=LOCK_WAIT_S)
            if lock is None:
                raise RuntimeError(f"cell {cell.name}: another process runs it (its lock {cell.lock_path} is held); "
                                   f"this job does nothing")
        previous = signal.signal(signal.SIGTERM, self._note_sigterm)
        try:
            action, command = cell.command(self.python)
            if action == "done":
                print(f"cell {cell.name}: done meanwhile, nothing to run", flush=True)
                return None
            print(f"cell {cell.name}: {action} on {job}", flush=True)
            usr_signal = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
            # The first task's run writes to cell.log, the others' to their task's log (submitit's).
            log = open_cell_log(cell, command) if job.global_rank == 0 else None
            try:
                self._child = start_run(command, log or sys.stdout, {**os.environ, **torchrun_env(job)}, lock,
                                        ignore_signals=(usr_signal,))
                while self._child.poll() is None:
                    time.sleep(1)
            finally:
                if log is not None:
                    log.close()
            return self._ended(self._child.returncode, job.global_rank)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if lock is not None:
                lock.release()

    def _ended(self, code: int, rank: int):
        cell = self.cell
        if code in (128 + signal.SIGTERM, 128 + signal.SIGINT) and self._sigterm:
            # Preempted or cancelled: SLURM's requeue signal, if it comes, ends this process (checkpoint()).
            time.sleep(STOP_WAIT_S)
        if code != 0:
            last = last_line(cell.log_path)
            raise RuntimeError(f"cell {cell.name}: the run ended with exit code {code}; log {cell.log_path}"
                               + (f"; last line: {last}" if last else ""))
        state, run_dir = cell_state(cell)
        if rank == 0 and state != "done":
            raise RuntimeError(f"cell {cell.name}: the run ended with exit code 0 but wrote no summary.json")
        return run_dir

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the requeue signal (time limit or preemption) in the job's first task: the run
        writes its checkpoint and ends, then the requeued job resumes it."""
        child = self._child
        if child is not None and child.returncode is None and not _exited(child.pid):
            time.sleep(SIGNAL_SETTLE_S)
            # One SIGTERM only: a second one would stop the run before it writes its checkpoint.
            if not self._sigterm and not _exited(child.pid):
                print(f"cell {self.cell.name}: time limit or preemption; stopping the run at a checkpoint",
                      flush=True)
                os.kill(child.pid, signal.SIGTERM)
            _exited(child.pid, wait=True)
        return require_submitit().helpers.DelayedSubmission(CellJob(self.cell, self.python))


# ------------------------------------------------------------------------------------------------ records
def _records(cell: Cell) -> list[dict]:
    path = os.path.join(cell.folder, JOBS_FILE)
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _record(cell: Cell, job_id: str, cluster: str, action: str) -> None:
    line = {"job_id": job_id, "cluster": cluster, "action": action,
            "submitted": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(cell.folder, JOBS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")


def _local_state(job_id: str) -> str:
    """A local-executor job (its id is the pid of the process that runs its tasks) is running while that
    process lives."""
    try:
        with open(f"/proc/{int(job_id)}/stat") as f:
            alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        try:
            os.kill(int(job_id), 0)
            alive = True
        except (OSError, ValueError):
            alive = False
    return "RUNNING" if alive else "ENDED"


def job_states(cells: list[Cell]) -> dict[str, str]:
    """The scheduler's state of each cell's last job, by cell name (one ``sacct`` call for all)."""
    states, slurm_jobs = {}, {}
    for cell in cells:
        records = _records(cell)
        if records and records[-1].get("cluster") == "local":
            states[cell.name] = _local_state(records[-1]["job_id"])
        elif records:
            folder = os.path.join(cell.folder, SUBMITIT_FOLDER)
            slurm_jobs[cell.name] = require_submitit().SlurmJob(folder, records[-1]["job_id"])
    if slurm_jobs:
        first = next(iter(slurm_jobs.values()))
        first.watcher.update()
        states.update({name: job.watcher.get_state(job.job_id, mode="cache") for name, job in slurm_jobs.items()})
    return {name: state.split()[0] if state else "UNKNOWN" for name, state in states.items()}


def cell_status(cell: Cell, state: str | None, lock_held_here: bool = False) -> tuple[str, str]:
    """``(label, detail)`` of a cell: done, running, queued, failed (with the last line of its log), unknown
    (a job the scheduler cannot tell about), resume or run (never submitted, with or without a checkpoint).
    ``state`` is the scheduler's state of its last job (:func:`job_states`) or None; ``lock_held_here``: this
    process holds the cell's lock (so no other process runs it)."""
    cell_done, run_dir = cell_state(cell)
    records = _records(cell)
    job = f"job {records[-1]['job_id']}" if records else ""
    if cell_done == "done":
        return "done", os.path.join(run_dir, "summary.json")
    if not lock_held_here and held_elsewhere(cell.lock_path):
        return "running", job or "in a local call"
    if state in QUEUED_STATES:
        return "queued", f"{job} ({state})"
    if state in RUNNING_STATES:
        return "running", job
    if state == "UNKNOWN":  # sacct knows a job only some seconds after its submission, and for a while after it
        return "unknown", (f"{job}: the scheduler has no state for it (sacct); if the job is gone, delete "
                           f"{os.path.join(cell.folder, JOBS_FILE)} to submit the cell again")
    if records:
        last = last_line(cell.log_path) or last_line(_job_stderr(cell, records[-1]["job_id"]))
        return "failed", f"{job} {state or 'ended'}" + (f"; last line: {last}" if last else "")
    return ("resume", run_dir) if cell_done == "resume" else ("run", "not started")


def _job_stderr(cell: Cell, job_id: str) -> str:
    return os.path.join(cell.folder, SUBMITIT_FOLDER, f"{job_id}_0_log.err")


@contextlib.contextmanager
def _importable_here():
    """This repository on the jobs' PYTHONPATH (SLURM and the local executor pass the environment on), so that
    a job can load its pickled :class:`CellJob` whatever folder the command ran from."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + ([before] if before else []))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def submit(cells: list[Cell], settings: SlurmSettings, python: str, cluster: str = "slurm", limit: int | None = None,
           say=print) -> dict:
    """Submit a job for each of ``cells`` (at most ``limit``) that is not done, not running and has no job queued
    or running; each decision under the cell's lock, so that concurrent calls submit a cell once. ``cluster``:
    submitit's executor, ``"local"`` for local processes. Returns the counts of submitted and skipped cells."""
    submitit = require_submitit()
    counts = {"submitted": 0, "skipped": 0}
    states = job_states(cells)
    with _importable_here():
        for cell in cells:
            if limit is not None and counts["submitted"] >= limit:
                say(f"--max-cells {limit}: the other cells are left for a later call")
                break
            lock = try_lock(cell.lock_path, PROBE_WAIT_S)
            if lock is None:
                say(f"skip   {cell.name}: running (its lock {cell.lock_path} is held)")
                counts["skipped"] += 1
                continue
            try:
                label, detail = cell_status(cell, states.get(cell.name), lock_held_here=True)
                if label in ("done", "queued", "running", "unknown"):
                    say(f"skip   {cell.name}: {label}, {detail}")
                    counts["skipped"] += 1
                    continue
                executor = submitit.AutoExecutor(
                    folder=os.path.join(cell.folder, SUBMITIT_FOLDER), cluster=cluster,
                    **{f"{cluster}_python": shlex.quote(python), f"{cluster}_max_num_timeout": MAX_TIMEOUTS})
                tasks = max(1, settings.gpus_per_cell)
                executor.update_parameters(
                    name=cell.name, timeout_min=settings.timeout_min, nodes=1, tasks_per_node=tasks,
                    gpus_per_node=settings.gpus_per_cell, cpus_per_task=settings.cpus_per_gpu,
                    slurm_partition=settings.partition or None, slurm_account=settings.account or None)
                job = executor.submit(CellJob(cell, python))
                action = cell_state(cell)[0]
                _record(cell, str(job.job_id), cluster, action)
                counts["submitted"] += 1
                say(f"submit {cell.name}: job {job.job_id}" + (" (resumes its run)" if action == "resume" else ""))
            finally:
                lock.release()
    return counts


def print_status(cells: list[Cell]) -> dict:
    """One line per cell with its state (see :func:`cell_status`); returns the count of each state."""
    states = job_states(cells)
    counts: dict[str, int] = {}
    for cell in cells:
        label, detail = cell_status(cell, states.get(cell.name))
        counts[label] = counts.get(label, 0) + 1
        print(f"{label:<8} {cell.name}: {detail}")
    return counts
