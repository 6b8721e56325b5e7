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

A call takes a cell's lock (``cell.lock`` in its folder, :mod:`utils.system.locks`) when it starts the cell, makes the
choice above under it, and holds it until the run ends; the run inherits it. Another call, or a SLURM job,
skips a locked cell, so concurrent calls on one plan and folder run each cell once. Before any cell starts,
the teachers' weights and CIFAR test sets that the cells need are fetched once (:func:`prefetch`). A run gets
SIGTERM, and so checkpoints, when its launcher dies (Linux). ``--launcher slurm`` submits the cells as SLURM
jobs instead (:mod:`.slurm`); ``--status`` says where each cell is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time

from ..data.loaders import _torchvision_cifar, find_image_folder
from ..models import fetch_teacher_weights
from ..reports.results import METRICS, SUMMARY_FILE, load_summaries, results_markdown, variants_markdown
from ..system.errors import UserError
from ..system.locks import CELL_LOCK, held_elsewhere
from .cells import Cell, cell_state, short_path
from .local import Task, clock, run_cells, skip_locked
from .plans import PLANS_DIR, Plan, expand_cells, load_plan, resolve_plan
from .slurm import print_status, require_submitit, slurm_settings, submit

__all__ = ["build_parser", "main", "prefetch", "reproduce"]

RESULTS_FILE = "results.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/reproduce.py", description="Run every cell of a plan that has no result yet, then tabulate.",
        epilog=f"Plans: {', '.join(sorted(f[:-6] for f in os.listdir(PLANS_DIR) if f.endswith('.hocon')))} "
               f"in {short_path(PLANS_DIR)}; copy one to make your own. Two calls on one plan and folder share the "
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


def _write_results(plan_dir: str, cells: list[Cell], metric: str, baseline: str = "baseline") -> int:
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
        text = variants_markdown(summaries, [cell.variant for cell in cells], baseline) + "\n" + text
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
    runs started together then find them instead of waiting on each other's download (utils/system/locks.py); a
    missing file or no network stops here, with the cell that needs it. Cheap when the files are there."""
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
        _say_counts(plan, plan_dir, cells, print_status(cells))
        return 0

    tasks, counts = [], {"run": 0, "resume": 0, "done": 0, "running": 0}
    print(f"plan {plan.name} ({short_path(plan.path)}): {plan.description}".rstrip(": "))
    for cell in cells:
        state, run_dir = cell_state(cell)
        if state != "done" and held_elsewhere(cell.lock_path):
            counts["running"] += 1
            print(skip_locked(cell))
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
    _write_results(plan_dir, cells, args.metric, plan.baseline)
    if elsewhere:
        print(f"{elsewhere} cell(s) ran in another call; rerun when it has ended to tabulate them")
    if failed:
        print(f"\n{len(failed)} of {len(tasks)} started cell(s) failed:", file=sys.stderr)
        for task in failed:
            print(f"  {task.cell.name}: {task.detail}", file=sys.stderr)
    print(f"total time {clock(time.time() - start)}")
    if not completed:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    return 1 if failed else 0


def _say_counts(plan: Plan, plan_dir: str, cells: list[Cell], counts: dict) -> None:
    print(f"{len(cells)} cells of plan {plan.name} in {plan_dir}: "
          + ", ".join(f"{n} {label}" for label, n in counts.items()))


def _slurm(args, plan: Plan, flags: dict, start: float) -> int:
    """``--launcher slurm``: submit the missing cells, or (``--status``) say where each one is."""
    require_submitit()
    settings = slurm_settings(plan.slurm, f"plan {plan.path}: slurm", **flags)
    save_path = args.save_path or plan.save_path
    plan_dir = os.path.join(save_path, plan.name)
    cells = expand_cells(plan, save_path, args.set, gpu_index=False)
    if args.status:
        _say_counts(plan, plan_dir, cells, print_status(cells))
        return 0
    print(f"plan {plan.name} ({short_path(plan.path)}): {plan.description}".rstrip(": "))
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
    _write_results(plan_dir, cells, args.metric, plan.baseline)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return reproduce(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
