"""Whole tables in one command: expand a plan into cells, run what is missing, tabulate what finished.

A plan is a hocon file (``tools/plans/*.hocon``) with the keys of :data:`PLAN_KEYS`. Its cells are every
config x bit-width x act_mode x seed, and with ``variants`` every config x variant x bit-width x act_mode x seed:
a variant is a named list of ``key=value`` overrides, and ``per_config`` may give a config (by file name) only
some of the variants and overrides of its own. Cell ``NAME`` (``{config}_W{b}A{b}_{act_mode}_id{seed}``, with
variants ``{config}_W{b}A{b}_{act_mode}_{variant}_id{seed}``) lives in ``save_path/<plan>/NAME/``: that folder
is the run's ``save_path``, so the run makes its own timestamped directory inside, and ``cell.log`` there
collects the command's output over every attempt. On each call a cell is

- done when a run directory in its folder holds ``summary.json`` (skipped),
- resumed with ``--resume RUN_DIR`` when a run directory holds ``checkpoint.pt`` but no summary
  (the newest such checkpoint),
- run afresh otherwise (a run that stopped before its first checkpoint is left where it is).

A call takes a cell's lock (``cell.lock`` in its folder, :mod:`utils.locks`) when it starts the cell, makes the
choice above under it, and holds it until the run ends; the run inherits it. Another call, or a SLURM job,
skips a locked cell, so concurrent calls on one plan and folder run each cell once. Before any cell starts,
the teachers' weights and CIFAR test sets that the cells need are fetched once (:func:`prefetch`). A run gets
SIGTERM, and so checkpoints, when its launcher dies (Linux). ``--launcher slurm`` submits the cells as SLURM
jobs instead (:mod:`utils.slurm`); ``--status`` says where each cell is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pyhocon import ConfigFactory

from .errors import ConfigError, UserError
from .locks import CELL_LOCK, PROBE_WAIT_S, held_elsewhere, lock_fd, try_lock
from .results import METRICS, SUMMARY_FILE, load_summaries, results_markdown, variants_markdown

__all__ = ["PLAN_KEYS", "PLANS_DIR", "Cell", "Plan", "Task", "cell_state", "claim", "expand_cells", "load_plan", "main",
           "cpu_threads", "open_cell_log", "prefetch", "resolve_plan", "run_cells", "start_run"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS_DIR = os.path.join(ROOT, "tools", "plans")
CHECKPOINT = "checkpoint.pt"  # as utils.trainer writes it; not imported, so that a dry run needs no trainer
CELL_LOG = "cell.log"
RESULTS_FILE = "results.md"
DEFAULT_SAVE_PATH = "./runs"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# key -> (type, required, what it holds)
PLAN_KEYS = {
    "description": (str, False, "one line shown when the plan starts"),
    "configs": (list[str], True, "hocon configs; relative paths are read from the repository root"),
    "bits": (list[int], True, "bit-widths; each cell quantizes weights and activations to the same bits"),
    "act_modes": (list[str], True, "activation quantizers, passed as --set act_mode=..."),
    "seeds": (list[int], True, "run ids (--id); the random seed is id + 1"),
    "set": (list[str], False, "key=value overrides added to every cell"),
    "save_path": (str, False, f"cells go to <save_path>/<plan name>/<cell>/ (default {DEFAULT_SAVE_PATH})"),
    "slurm": (dict, False, "for --launcher slurm: partition, time, gpus_per_cell, cpus_per_gpu, account"),
    "variants": (dict, False, "variant name -> list of key=value overrides; each config runs every variant unless "
                              "per_config says otherwise, and the name goes into the cell's name"),
    "per_config": (dict, False, "config file name without .hocon -> {variants = [names it runs], set = [its own "
                                "key=value overrides]}, both optional"),
}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*$")
# Config keys a cell sets itself; an override of one would make the cell's name lie.
RESERVED_KEYS = {"save_path": "use the plan's save_path or --save-path", "act_mode": "list it in act_modes",
                 "qw": "list the bit-width in bits", "qa": "list the bit-width in bits"}


@dataclass(frozen=True)
class Plan:
    name: str
    path: str
    description: str
    configs: tuple[str, ...]
    bits: tuple[int, ...]
    act_modes: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    save_path: str
    slurm: dict = dataclasses.field(default_factory=dict)  # checked: utils.slurm.slurm_settings
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, overrides); none: cells keep their old names
    per_config: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()  # (stem, variant names, overrides)


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
        from .config import load_options

        return load_options(self.config, self.overrides, qw=self.bits, qa=self.bits)

    def command(self, python: str) -> tuple[str, list[str]]:
        """What to do now (``"done"``, ``"resume"`` or ``"run"``, see :func:`cell_state`) and the command
        that does it (empty when done)."""
        state, run_dir = cell_state(self)
        if state == "done":
            return state, []
        return state, self.fresh_command(python) if state == "run" else self.resume_command(python, run_dir)

    def fresh_command(self, python: str) -> list[str]:
        command = [python, _short(self.main_py), "--conf_path", _short(self.config), "--id", str(self.seed),
                   "--qw", str(self.bits), "--qa", str(self.bits)]
        for override in self.overrides:
            command += ["--set", override]
        return command

    def resume_command(self, python: str, run_dir: str) -> list[str]:
        # The run's own config (in its checkpoint) applies; --set is not given, as main.py would refuse a change.
        return [python, _short(self.main_py), "--resume", run_dir]


def _short(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def resolve_plan(name_or_path: str) -> str:
    """The plan file: a path to a hocon file, or the name of one in ``tools/plans``."""
    if os.path.isfile(name_or_path):
        return name_or_path
    named = os.path.join(PLANS_DIR, f"{name_or_path}.hocon")
    if os.sep not in name_or_path and os.path.isfile(named):
        return named
    known = sorted(f[:-len(".hocon")] for f in os.listdir(PLANS_DIR) if f.endswith(".hocon"))
    raise UserError(f"--plan {name_or_path!r}: no such file, and no plan of that name in {_short(PLANS_DIR)} "
                    f"(plans there: {', '.join(known)})")


def _check_type(path: str, key: str, value, kind):
    item = getattr(kind, "__args__", (None,))[0]
    if item is None:
        ok = isinstance(value, kind)
    else:
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        what = {str: "a string", list[str]: "a list of strings", list[int]: "a list of integers",
                dict: "a block of keys, e.g. {partition = gpu}"}[kind]
        raise UserError(f"plan {path}: {key} must be {what}, got {value!r}")
    if item is not None and key != "set" and not value:
        raise UserError(f"plan {path}: {key} is empty; list at least one")
    if item is not None and len(set(value)) != len(value):
        raise UserError(f"plan {path}: {key} lists a value twice: {value}")
    return tuple(value) if item is not None else value


def load_plan(path: str) -> Plan:
    """Read and check a plan file; every error names the plan, the key and the fix."""
    try:
        values = dict(ConfigFactory.parse_file(path).as_plain_ordered_dict())
    except Exception as error:  # pyhocon raises its own and pyparsing's exceptions
        raise UserError(f"plan {path} cannot be parsed: {error}") from None
    unknown = [k for k in values if k not in PLAN_KEYS]
    if unknown:
        raise UserError(f"plan {path}: unknown key(s): {', '.join(unknown)}. Valid keys: {', '.join(PLAN_KEYS)}")
    missing = [k for k, (_, required, _) in PLAN_KEYS.items() if required and k not in values]
    if missing:
        raise UserError(f"plan {path} lacks {', '.join(missing)}: "
                        + "; ".join(f"{k}: {PLAN_KEYS[k][2]}" for k in missing))
    checked = {k: _check_type(path, k, v, PLAN_KEYS[k][0]) for k, v in values.items() if PLAN_KEYS[k][0] is not dict}
    configs = []
    for config in checked["configs"]:
        resolved = config if os.path.isabs(config) else os.path.join(ROOT, config)
        if not os.path.isfile(resolved):
            raise UserError(f"plan {path}: config file {config!r} does not exist (relative paths are read from "
                            f"the repository root, {ROOT})")
        configs.append(resolved)
    from .slurm import slurm_settings

    slurm = dict(_check_type(path, "slurm", values.get("slurm", {}), dict))
    slurm_settings(slurm, f"plan {path}: slurm")
    variants = _check_variants(path, values.get("variants", {}))
    per_config = _check_per_config(path, values.get("per_config", {}), configs, dict(variants))
    return Plan(name=os.path.splitext(os.path.basename(path))[0], path=path,
                description=checked.get("description", ""), configs=tuple(configs), bits=checked["bits"],
                act_modes=checked["act_modes"], seeds=checked["seeds"], overrides=checked.get("set", ()),
                save_path=checked.get("save_path", DEFAULT_SAVE_PATH), slurm=slurm, variants=variants,
                per_config=per_config)


def _string_list(path: str, where: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"plan {path}: {where} must be a list of strings, got {value!r}")
    return tuple(value)


def _check_variants(path: str, value) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise UserError(f"plan {path}: variants must be a map of name = [key=value, ...], got {value!r}")
    for name in value:
        if not VARIANT_NAME.match(name):
            raise UserError(f"plan {path}: variant name {name!r} must be letters, digits, _ or -")
    return tuple((name, _string_list(path, f"variants.{name}", overrides)) for name, overrides in value.items())


def _check_per_config(path: str, value, configs, variants: dict):
    if not isinstance(value, dict):
        raise UserError(f"plan {path}: per_config must be a map of config name = {{variants = [...], set = [...]}}")
    stems = [os.path.splitext(os.path.basename(config))[0] for config in configs]
    groups = []
    for stem, group in value.items():
        if stem not in stems:
            raise UserError(f"plan {path}: per_config.{stem} names no config of the plan ({', '.join(stems)})")
        unknown = [key for key in (group if isinstance(group, dict) else {}) if key not in ("variants", "set")]
        if not isinstance(group, dict) or unknown:
            raise UserError(f"plan {path}: per_config.{stem} must be {{variants = [...], set = [...]}}")
        names = _string_list(path, f"per_config.{stem}.variants", group.get("variants", []))
        missing = [name for name in names if name not in variants]
        if missing:
            raise UserError(f"plan {path}: per_config.{stem}.variants names {', '.join(missing)}, not among the "
                            f"variants ({', '.join(variants) or 'none'})")
        groups.append((stem, names, _string_list(path, f"per_config.{stem}.set", group.get("set", []))))
    return tuple(groups)


def _check_overrides(overrides, where: str) -> None:
    from .config import parse_override

    for text in overrides:
        try:
            key, _ = parse_override(text)
        except ConfigError as error:
            raise UserError(f"{where}: {error}") from None
        if key in RESERVED_KEYS:
            raise UserError(f"{where}: {key} is set by each cell; {RESERVED_KEYS[key]}")


def expand_cells(plan: Plan, save_path: str, extra_overrides=(), gpu_index: bool = False) -> list[Cell]:
    """Every cell of ``plan``, its config loaded and checked as ``main.py`` would (so a typo in an
    override stops here, not in every cell). ``gpu_index`` adds ``GPU=0`` for runs pinned by
    CUDA_VISIBLE_DEVICES."""
    from .config import load_options

    _check_overrides(plan.overrides, f"plan {plan.path}: set")
    _check_overrides(extra_overrides, "--set")
    for variant, overrides in plan.variants:
        _check_overrides(overrides, f"plan {plan.path}: variants.{variant}")
    groups = {stem: (names, overrides) for stem, names, overrides in plan.per_config}
    for stem, (_, overrides) in groups.items():
        _check_overrides(overrides, f"plan {plan.path}: per_config.{stem}.set")
    cells, names = [], {}
    for config, (variant, variant_overrides), bits, act_mode, seed in itertools.product(
            plan.configs, plan.variants or (("", ()),), plan.bits, plan.act_modes, plan.seeds):
        stem = os.path.splitext(os.path.basename(config))[0]
        chosen, config_overrides = groups.get(stem, ((), ()))
        if chosen and variant not in chosen:
            continue
        name = f"{stem}_W{bits}A{bits}_{act_mode}" + (f"_{variant}" if variant else "") + f"_id{seed}"
        if name in names:
            raise UserError(f"plan {plan.path}: configs {names[name]} and {config} have the same file name, so "
                            f"their cells would share folders; rename one")
        names[name] = config
        folder = os.path.join(save_path, plan.name, name)
        overrides = (f"act_mode={act_mode}", *plan.overrides, *config_overrides, *variant_overrides,
                     *extra_overrides, f"save_path={folder}", *(["GPU=0"] if gpu_index else []))
        try:
            options = load_options(config, overrides, qw=bits, qa=bits)
        except ConfigError as error:
            raise UserError(f"cell {name}: {error}") from None
        folder_name = "ImageNet" if options.dataset == "imagenet" else "CIFAR"
        cells.append(Cell(name, config, bits, act_mode, seed, folder, os.path.join(ROOT, folder_name, "main.py"),
                          overrides, variant))
    return cells


def cell_state(cell: Cell) -> tuple[str, str | None]:
    """``("done", run_dir)``, ``("resume", run_dir)`` or ``("run", None)``; see the module docstring."""
    finished = sorted(glob.glob(os.path.join(glob.escape(cell.folder), "*", SUMMARY_FILE)))
    if finished:
        return "done", os.path.dirname(finished[0])
    checkpoints = glob.glob(os.path.join(glob.escape(cell.folder), "*", CHECKPOINT))
    if checkpoints:
        return "resume", os.path.dirname(max(checkpoints, key=os.path.getmtime))
    return "run", None


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


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


def _say(text: str, start: float) -> None:
    print(f"[{_clock(time.time() - start)}] {text}", flush=True)


def _skip_locked(cell: Cell) -> str:
    return f"skip   {cell.name}: running in another call (its lock {cell.lock_path} is held)"


def claim(task: Task):
    """The cell's lock, with ``task.action`` and ``task.command`` set from the cell's state now; None when
    another process holds the lock (``task.outcome = "locked"``) or the cell finished meanwhile ("skipped"),
    the line to print then in ``task.detail``. Release the lock once the run has ended."""
    lock = try_lock(task.cell.lock_path, PROBE_WAIT_S)
    if lock is None:
        task.outcome, task.detail = "locked", _skip_locked(task.cell)
        return None
    task.action, task.command = task.cell.command(task.python)
    if task.action == "done":
        lock.release()
        task.outcome, task.detail = "skipped", f"skip   {task.cell.name}: done meanwhile by another call"
        return None
    return lock


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


def open_cell_log(cell: Cell, command: list[str], env: dict | None = None):
    """``cell.log``, opened for appending, with a line that dates and shows the command and the ``env`` it gets
    beyond this process's environment."""
    os.makedirs(cell.folder, exist_ok=True)
    log = open(cell.log_path, "a")
    extra = "".join(f"{key}={value} " for key, value in (env or {}).items())
    log.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {extra}{shlex.join(command)}\n")
    log.flush()
    return log


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
    _say(f"start  {number} {task.cell.name}{where}{what}", start)
    return _Running(task, process, log, lock, time.time(), slot, number)


def _finish(running: _Running, start: float) -> None:
    running.log.close()
    running.lock.release()
    task, code, number = running.task, running.process.returncode, running.number
    took = _clock(time.time() - running.started)
    state, run_dir = cell_state(task.cell)
    if code == 0 and state == "done":
        task.outcome = "done"
        summary = load_summaries([run_dir])[0]
        top1 = summary.get("student_top1")
        task.detail = f"student_top1 {top1:.2f}" if top1 is not None else "no student_top1"
        _say(f"done   {number} {task.cell.name} in {took}: {task.detail}", start)
    elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        task.outcome = "interrupted"
        _say(f"stopped {number} {task.cell.name} after {took}: interrupted, rerun to resume; log {task.cell.log_path}",
             start)
    else:
        task.outcome = "failed"
        reason = f"exit code {code}" if code != 0 else f"exit code 0 but no {SUMMARY_FILE}"
        last = _last_line(task.cell.log_path)
        task.detail = f"{reason}; log {task.cell.log_path}" + (f"; last line: {last}" if last else "")
        _say(f"FAILED {number} {task.cell.name} after {took}: {task.detail}", start)


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
                    _say(task.detail, start)
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
        _say(f"interrupted: stopping {len(running)} run(s); each writes a checkpoint (Ctrl-C again: stop at once)",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/reproduce.py", description="Run every cell of a plan that has no result yet, then tabulate.",
        epilog=f"Plans: {', '.join(sorted(f[:-6] for f in os.listdir(PLANS_DIR) if f.endswith('.hocon')))} "
               f"in {_short(PLANS_DIR)}; copy one to make your own. Two calls on one plan and folder share the "
               f"work: a running cell holds <cell>/{CELL_LOCK} and the other call skips it. A run gets SIGTERM "
               f"when the call that started it dies, and checkpoints (Linux; elsewhere it runs on to its end).")
    parser.add_argument("--plan", required=True, help="a plan name in tools/plans or a path to a plan hocon file")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="ID", help="run ids, instead of the plan's seeds")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="run and tabulate only these of the plan's variants")
    parser.add_argument("--save-path", help="instead of the plan's save_path (default ./runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every cell; repeatable")
    parser.add_argument("--jobs", type=int,
                        help="cells run at once (default: one per GPU of --gpus, else 1). Without --gpus, N > 1 "
                             "and several visible GPUs, the cells are spread over all of them: each run sees one "
                             "(CUDA_VISIBLE_DEVICES) and uses GPU=0")
    parser.add_argument("--gpus", help="comma-separated GPU ids, e.g. 0,1: each run sees one "
                                       "(CUDA_VISIBLE_DEVICES) and uses GPU=0; without it (and --jobs 1) runs see "
                                       "every device")
    parser.add_argument("--python", default=sys.executable, help="interpreter for main.py (default: this one)")
    parser.add_argument("--max-cells", type=int, metavar="N", help="start at most N cells this time")
    parser.add_argument("--metric", choices=METRICS, default="student_top1", help="metric of the results table")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each cell's command, or why it is skipped or resumed; run or fetch nothing")
    parser.add_argument("--status", action="store_true",
                        help="print each cell's state (done, running, queued, failed with the last log line, "
                             "resume, run) and start nothing")
    cluster = parser.add_argument_group(
        "cluster", "--launcher slurm submits each cell without a result, job queued or job running as one SLURM "
                   "job (needs submitit: pip install submitit) and returns; run the same command again to submit "
                   "what failed or stopped (it resumes), --status to follow. These flags replace the keys of the "
                   "plan's slurm block.")
    cluster.add_argument("--launcher", choices=("local", "slurm"), default="local",
                         help="local: run the cells here (default); slurm: submit them")
    cluster.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    cluster.add_argument("--time", help="time limit per job, minutes or [D-]HH:MM[:SS] (default 24:00:00); at the "
                                        "limit the run checkpoints and the job is requeued to resume it")
    cluster.add_argument("--gpus-per-cell", type=int, metavar="N",
                         help="GPUs per cell on one node (default 1): one task, one process of the run, per GPU")
    cluster.add_argument("--cpus-per-gpu", type=int, metavar="N", help="CPUs per task (default 8)")
    cluster.add_argument("--account", help="SLURM account to charge (default: yours)")
    # Which submitit executor runs the jobs: "local" runs them as local processes, for the tests.
    cluster.add_argument("--submitit-cluster", default="slurm", help=argparse.SUPPRESS)
    return parser


def _gpu_list(text: str | None) -> list[str]:
    if text is None:
        return []
    gpus = [g.strip() for g in text.split(",")]
    if not all(gpus):
        raise UserError(f"--gpus {text!r}: give comma-separated GPU ids such as 0,1,2")
    return gpus


def _write_results(plan_dir: str, cells: list[Cell], metric: str) -> int:
    variants = {}  # run directory of each finished cell -> its variant
    for cell in cells:
        state, run_dir = cell_state(cell)
        if state == "done":
            variants[os.path.realpath(run_dir)] = cell.variant
    done = list(variants)
    if not done:
        print(f"no cell has finished: no {RESULTS_FILE} written")
        return 0
    summaries = load_summaries(done)
    for summary in summaries:  # the plan's variant names head the tables of their runs
        summary["variant"] = variants.get(os.path.dirname(summary["summary_path"]), "")
    text = results_markdown(summaries, metric)
    if any(cell.variant for cell in cells):
        text = variants_markdown(summaries, [cell.variant for cell in cells]) + "\n" + text
    path = os.path.join(plan_dir, RESULTS_FILE)
    with open(path, "w") as f:
        f.write(text)
    print(f"\n{len(done)} of {len(cells)} cells finished; table written to {path}\n")
    sys.stdout.write(text)
    return len(done)


def _visible_gpus() -> list[str]:
    """The ids of the GPUs this process sees, as CUDA_VISIBLE_DEVICES names them for a child."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [g.strip() for g in listed.split(",")] if listed else [str(i) for i in range(count)]
    return names[:count]


def prefetch(cells: list[Cell], say=print) -> None:
    """Fetch each teacher's weights and each CIFAR test set the cells need, once, before any cell starts:
    runs started together then find them instead of waiting on each other's download (utils/locks.py); a
    missing file or no network stops here, with the cell that needs it. Cheap when the files are there."""
    from .data import _torchvision_cifar, find_image_folder
    from .models import fetch_teacher_weights

    seen = set()
    for cell in cells:
        options = cell.options()
        teacher = (options.network, options.teacher_weights)
        data = (options.dataset, options.dataPath)
        try:
            if teacher not in seen and options.teacher_weights != "random":
                seen.add(teacher)
                say(f"fetch  teacher {options.network}: {fetch_teacher_weights(*teacher)}")
            if data not in seen and options.dataset != "imagenet" and find_image_folder(options.dataPath) is None:
                seen.add(data)
                _torchvision_cifar(options, None)
                say(f"fetch  {options.dataset} test set: {options.dataPath}")
        except UserError as error:
            raise UserError(f"cell {cell.name}: {error}") from None


def _chosen_variants(plan: Plan, names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    known = dict(plan.variants)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"--variants {' '.join(unknown)}: plan {plan.name} has "
                        + (f"the variants {', '.join(known)}" if known else "no variants"))
    return tuple((name, known[name]) for name in dict.fromkeys(names))


def reproduce(args) -> int:
    start = time.time()
    plan = load_plan(resolve_plan(args.plan))
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(dict.fromkeys(args.seeds)))
    if args.variants:
        plan = dataclasses.replace(plan, variants=_chosen_variants(plan, args.variants))
    gpus = _gpu_list(args.gpus)
    jobs = args.jobs if args.jobs is not None else max(1, len(gpus))
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    if args.max_cells is not None and args.max_cells < 0:
        raise UserError(f"--max-cells {args.max_cells}: give 0 or more")
    slurm_flags = {"partition": args.partition, "time": args.time, "gpus_per_cell": args.gpus_per_cell,
                   "cpus_per_gpu": args.cpus_per_gpu, "account": args.account}
    if args.launcher == "slurm":
        if args.gpus or args.jobs is not None:
            raise UserError("--gpus and --jobs are for --launcher local; SLURM places the jobs (--gpus-per-cell)")
        return _slurm(args, plan, slurm_flags, start)
    given = [f"--{key.replace('_', '-')}" for key, value in slurm_flags.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only with --launcher slurm")
    if not gpus and jobs > 1 and len(visible := _visible_gpus()) > 1:
        gpus = visible
        print(f"--jobs {jobs} and {len(gpus)} visible GPUs: the cells are spread over GPUs {','.join(gpus)}, each "
              f"run sees one (CUDA_VISIBLE_DEVICES); --gpus picks others")
    save_path = args.save_path or plan.save_path
    plan_dir = os.path.join(save_path, plan.name)
    cells = expand_cells(plan, save_path, args.set, gpu_index=bool(gpus))
    if args.status:
        from .slurm import print_status

        _say_counts(plan, plan_dir, cells, print_status(cells))
        return 0

    tasks, counts = [], {"run": 0, "resume": 0, "done": 0, "running": 0}
    print(f"plan {plan.name} ({_short(plan.path)}): {plan.description}".rstrip(": "))
    for cell in cells:
        state, run_dir = cell_state(cell)
        if state != "done" and held_elsewhere(cell.lock_path):
            counts["running"] += 1
            print(_skip_locked(cell))
            continue
        counts[state] += 1
        if state == "done":
            print(f"skip   {cell.name}: done, {os.path.join(run_dir, SUMMARY_FILE)}")
            continue
        tasks.append(Task(cell, args.python))
        if args.dry_run:
            print(f"{state:<6} {cell.name}: {shlex.join(cell.command(args.python)[1])}")
    print(f"{len(cells)} cells in {plan_dir}: {counts['run']} to run, {counts['resume']} to resume, "
          f"{counts['done']} done" + (f", {counts['running']} running in another call" if counts["running"] else "")
          + (f"; {jobs} at a time" if tasks else ""))
    if args.dry_run:
        if gpus:
            print(f"each run gets CUDA_VISIBLE_DEVICES set to one of {','.join(gpus)}")
        print("dry run: nothing was started")
        return 0
    if args.max_cells is not None and len(tasks) > args.max_cells:
        print(f"--max-cells {args.max_cells}: starting {args.max_cells} now, {len(tasks) - args.max_cells} left "
              f"for a later call")
        tasks = tasks[:args.max_cells]
    prefetch([task.cell for task in tasks])
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    try:
        completed = run_cells(tasks, jobs, gpus, start)
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [t for t in tasks if t.outcome == "failed"]
    elsewhere = counts["running"] + sum(t.outcome == "locked" for t in tasks)
    _write_results(plan_dir, cells, args.metric)
    if elsewhere:
        print(f"{elsewhere} cell(s) ran in another call; rerun when it has ended to tabulate them")
    if failed:
        print(f"\n{len(failed)} of {len(tasks)} started cell(s) failed:", file=sys.stderr)
        for task in failed:
            print(f"  {task.cell.name}: {task.detail}", file=sys.stderr)
    print(f"total time {_clock(time.time() - start)}")
    if not completed:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    return 1 if failed else 0


def _say_counts(plan: Plan, plan_dir: str, cells: list[Cell], counts: dict) -> None:
    print(f"{len(cells)} cells of plan {plan.name} in {plan_dir}: "
          + ", ".join(f"{n} {label}" for label, n in counts.items()))


def _slurm(args, plan: Plan, flags: dict, start: float) -> int:
    """``--launcher slurm``: submit the missing cells, or (``--status``) say where each one is."""
    from .slurm import print_status, require_submitit, slurm_settings, submit

    require_submitit()
    settings = slurm_settings(plan.slurm, f"plan {plan.path}: slurm", **flags)
    save_path = args.save_path or plan.save_path
    plan_dir = os.path.join(save_path, plan.name)
    cells = expand_cells(plan, save_path, args.set, gpu_index=False)
    if args.status:
        _say_counts(plan, plan_dir, cells, print_status(cells))
        return 0
    print(f"plan {plan.name} ({_short(plan.path)}): {plan.description}".rstrip(": "))
    print(f"{len(cells)} cells in {plan_dir}; each missing one a SLURM job: {settings.describe()}")
    if args.dry_run:
        counts = print_status(cells)
        would = sum(counts.get(label, 0) for label in ("run", "resume", "failed"))
        print(f"dry run: nothing was submitted ({would} cell(s) would be)")
        return 0
    # Fetched here: compute nodes are often offline.
    prefetch([cell for cell in cells if cell_state(cell)[0] != "done"])
    counts = submit(cells, settings, args.python, args.submitit_cluster, limit=args.max_cells)
    print(f"{counts['submitted']} job(s) submitted, {counts['skipped']} cell(s) skipped; rerun this command with "
          f"--status to follow them, and without it to submit what failed or stopped (it resumes)")
    _write_results(plan_dir, cells, args.metric)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return reproduce(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
