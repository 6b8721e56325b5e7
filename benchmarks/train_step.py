"""Seconds per training iteration (generator step + student step) and peak memory of the shared trainer.

    python benchmarks/train_step.py [--quick] [--json PATH] [--device cpu|cuda] [--settings ...]
                                    [--students ...] [--profile]

Settings, each with its official config: CIFAR-10 (ResNet-20, batch 16), CIFAR-100 (ResNet-20, batch 200),
ImageNet ResNet-18 and ResNet-50 (224x224, batch 16); by default the two CIFAR settings on the CPU and all
four on CUDA. Teacher weights random (speed does not depend on them), student training on from the first
iteration (warmup_epochs = 0) and layer-wise ranges tracked, as in the first epochs. Students (all four
by default, ``--students`` picks some; ``float`` is always measured, as the reference):

- ``float``: an unquantized copy of the teacher (the floor: what any zero-shot QAT step costs here);
- ``granq``: GranQ activations and kernel-wise weights through the default fast path (``quant_impl = auto``);
- ``granq eager``: the same with ``quant_impl = eager``;
- ``granq graphed`` (CUDA only, and there by default): ``granq`` with the iteration replayed as a CUDA graph
  (:class:`utils.training.graphs.GraphedStep`, as ``cuda_graph = auto`` runs it); its warm-up and capture are
  untimed;
- ``layerwise``: one moving-average activation range per layer (GDFQ; eager), weights as ``granq``;
- ``granq+NAME`` (only when named): ``granq`` with a variant of ``tools/plans/addons_cpu.hocon`` (``attention``,
  ``cam``, ``reliable_ce``, ``pseudo_label``, ``lowpass``, ``all`` of them, the recipe ``plus``, ...): what each
  add-on of docs/addons.md costs;
- ``granq pool``, ``synq pool`` (only when named): ``granq`` trained on a pool of synthetic images instead of a
  generator (``image_source = pool``; a small pool synthesised in memory first, untimed), and the recipe ``synq``
  on one (docs/methods.md).

``quant_impl = auto`` runs eager where the compiled path fails; each record's ``quant_path`` says which
ran (:func:`quantization_utils.quant_path`), and the table then heads the ``granq`` column ``granq(eager)``.

Models are laid out as the trainer lays them out (channels_last teacher and student on the CPU);
``--memory-format contiguous`` measures the default layout instead.

The iterations of the students alternate (one of each per round) so that a busy machine slows all of
them alike; each figure is the median, warm-up excluded. Peak memory is measured afterwards, per student,
on a trainer that builds and runs 3 iterations alone: on CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``, in this process once the other trainers are freed), on the CPU the
peak resident set size of a fresh process (Python and torch included); each also as its rise above the
figure once the models are built.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish, synchronize  # noqa: E402
from quantization_utils import quant_path, set_act_tracking  # noqa: E402
from utils.models import build_teacher  # noqa: E402
from utils.runs.config import load_options  # noqa: E402
from utils.sweeps.plans import load_plan, resolve_plan  # noqa: E402
from utils.system.devices import configure_backends  # noqa: E402
from utils.training.graphs import WARMUP_ITERATIONS, GraphedStep  # noqa: E402
from utils.training.pools import run_pool  # noqa: E402
from utils.training.trainer import Trainer  # noqa: E402

SETTINGS = {
    "cifar10": os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon"),
    "cifar100": os.path.join(ROOT, "CIFAR", "cifar100_resnet20.hocon"),
    "imagenet_res18": os.path.join(ROOT, "ImageNet", "imagenet_res18.hocon"),
    "imagenet_res50": os.path.join(ROOT, "ImageNet", "imagenet_res50.hocon"),
}
# An ImageNet training iteration takes seconds on a few CPU cores: measured there only when asked for.
CPU_SETTINGS = ("cifar10", "cifar100")
STUDENTS = {"float": [], "granq": ["quant_impl=auto"], "granq eager": ["quant_impl=eager"],
            "layerwise": ["act_mode=layerwise"], "granq graphed": ["quant_impl=auto"]}
DEFAULT_STUDENTS = ("float", "granq", "granq eager", "layerwise")  # and granq graphed on CUDA
GRAPHED = "granq graphed"
# GranQ students with the add-ons of docs/addons.md, measured only when named in --students: the cost of each term.
# They are the variants of the ablation plan, so that the costs pair with its accuracies.
ADDONS = {name: list(overrides) for name, overrides in load_plan(resolve_plan("addons_cpu")).variants
          if name != "baseline"}
STUDENTS.update({f"granq+{name}": ["quant_impl=auto", *overrides] for name, overrides in ADDONS.items()})
# Training on a pool: its iteration does not depend on the pool's size or quality, so a small one made in two steps.
POOL = ["image_source=pool", "pool_size=256", "pool_batch=256", "pool_iters=2", "pool_cache=off"]
STUDENTS.update({"granq pool": ["quant_impl=auto", *POOL], "synq pool": ["recipe=synq", *POOL]})


def student_path(student: str) -> str | None:
    """The quant_path of a student's quantizers (None for the float student, which has none)."""
    if student == "float":
        return None
    return quant_path("eager" if student == "granq eager" else "auto")


def untimed_iterations(student: str, warmup: int) -> int:
    """Iterations before timing: ``warmup``, and for the graphed student its eager ones and its capture too."""
    return warmup + (WARMUP_ITERATIONS + 1 if student == GRAPHED else 0)


class FloatStudentTrainer(Trainer):
    """The shared trainer with an unquantized student: the cost of the method without fake quantization."""

    def build_student(self, teacher: nn.Module) -> nn.Module:
        return copy.deepcopy(teacher)


def make_trainer(setting: str, student: str, device: torch.device, run_dir: str,
                 memory_format: str = "trainer") -> Trainer:
    options = load_options(SETTINGS[setting], ["teacher_weights=random", "warmup_epochs=0",
                                               *STUDENTS[student]])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    kind = FloatStudentTrainer if student == "float" else Trainer
    trainer = kind(options, teacher, None, device, run_dir, {"id": 0, "seed": 1}, run_pool(options, teacher, device))
    if memory_format == "contiguous":  # undo the trainer's choice, to measure it
        for model in filter(None, (trainer.teacher, trainer.student, trainer.generator)):
            model.to(memory_format=torch.contiguous_format)
    trainer.set_learning_rates(0)
    set_act_tracking(trainer.student, True)  # as in the first act_range_epochs epochs
    if student == GRAPHED:
        trainer.graphed_step = GraphedStep(trainer)
    return trainer


def timed_step(trainer: Trainer, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    (trainer.graphed_step or trainer.step)(train_student=True)
    synchronize(device)
    return time.perf_counter() - start


def _status_mib(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(match.group(1)) / 1024 if match else None
    except OSError:
        return None


def memory_worker(setting: str, student: str, device: torch.device, memory_format: str) -> dict:
    """Peak memory of a fresh process that builds one trainer and runs 3 iterations (the first compiles).

    CPU: the peak resident set size (VmHWM), and how far it rises above the resident size once the models
    are built. CUDA: the allocator's peak, and its rise above the memory allocated once the models are built.
    """
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(setting, student, device, run_dir, memory_format)
        synchronize(device)
        built = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mib("VmRSS")
        for _ in range(untimed_iterations(student, 3)):
            (trainer.graphed_step or trainer.step)(train_student=True)
        synchronize(device)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    else:
        peak, kind = _status_mib("VmHWM"), "cpu peak resident set size"
    if peak is None or built is None:
        return {"kind": "unavailable", "quant_path": student_path(student)}
    return {"kind": kind, "peak_mib": peak, "above_built_mib": peak - built, "quant_path": student_path(student)}


def peak_memory(setting: str, student: str, args) -> dict:
    """:func:`memory_worker` alone: on CUDA in this process, its other trainers freed first; on the CPU in a
    subprocess, as the resident set size counts everything the process ever held."""
    if args.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return memory_worker(setting, student, torch.device("cuda"), args.memory_format)
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", setting, student,
               "--device", args.device, "--memory-format", args.memory_format, "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker {setting} {student} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_setting(setting: str, device: torch.device, args, run_dir: str) -> dict:
    trainers = {name: make_trainer(setting, name, device, run_dir, args.memory_format) for name in args.students}
    for name, trainer in trainers.items():
        for _ in range(untimed_iterations(name, args.warmup)):  # compilation, allocator, caches, capture
            (trainer.graphed_step or trainer.step)(train_student=True)
    batch = trainers["float"].options.batchSize
    iterations = args.iters if args.iters else (args.iters_b16 if batch <= 16 else args.iters_b200)
    samples = {name: [] for name in trainers}
    for _ in range(iterations):
        for name, trainer in trainers.items():
            samples[name].append(timed_step(trainer, device))
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    # after the timed iterations: what they ran (None where no GranQ student was measured)
    path = student_path("granq") if "granq" in trainers else None
    del trainers, trainer  # free their memory before the memory workers run
    memory = {name: peak_memory(setting, name, args) for name in args.students} if args.memory else {}
    return {"setting": setting, "batch": batch, "device": device.type, "iterations": iterations,
            "memory_format": args.memory_format, "quant_path": path, "students": list(args.students),
            "seconds": seconds, "samples": samples, "memory": memory}


def profile_step(setting: str, student: str, device: torch.device, run_dir: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    trainer = make_trainer(setting, student, device, run_dir)
    for _ in range(untimed_iterations(student, 3)):
        (trainer.graphed_step or trainer.step)(train_student=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            (trainer.graphed_step or trainer.step)(train_student=True)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of 5 iterations, {setting}, {student} student:")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def print_table(results: list[dict]) -> None:
    names = results[0]["students"]
    eager = [r for r in results if "granq" in names and r["quant_path"] != "compiled"]
    labels = [f"{n}(eager)" if n == "granq" and eager else n for n in names]  # "granq" is the compiled path
    others = [n for n in names if n != "float"]
    width = max(12, *map(len, labels))
    print("\nseconds per iteration (median); peak memory of a trainer running only that student for 3 iterations")
    print(f"{'setting':14} {'batch':>5} {'device':6} " + " ".join(f"{n:>{width}}" for n in labels)
          + " ".join(f" {n + '/float':>{width + 6}}" for n in others))
    for r in results:
        s = r["seconds"]
        print(f"{r['setting']:14} {r['batch']:5} {r['device']:6} " + " ".join(f"{s[n]:{width}.4f}" for n in names)
              + " ".join(f" {s[n] / s['float']:{width + 6}.2f}" for n in others))
        memory = r["memory"]
        if memory and all("peak_mib" in memory[n] for n in names):
            print(f"{'':14} {'':5} {'peak':6} " + " ".join(f"{memory[n]['peak_mib']:{width}.0f}" for n in names)
                  + f"   MiB, {memory['float']['kind']}")
            above = " ".join(f"{memory[n]['above_built_mib']:{width}.0f}" for n in names)
            print(f"{'':14} {'':5} {'+built':6} " + above
                  + "   MiB above the models built")
    if "granq" in names:
        print("\nquant_path: " + "; ".join(f"{r['setting']}: {r['quant_path']}" for r in results))
        print("\ntargets (one run):")
        for r in results:
            ratio = r["seconds"]["granq"] / r["seconds"]["float"]
            label = "granq" if r["quant_path"] == "compiled" else "granq(eager)"
            print(f"  {r['setting']} batch {r['batch']} {r['device']}: {label} / float student {ratio:.2f}x "
                  f"(target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS),
                        help=f"default: {' '.join(CPU_SETTINGS)} on the CPU, all on CUDA")
    parser.add_argument("--students", nargs="+", choices=tuple(STUDENTS), default=list(DEFAULT_STUDENTS),
                        help="students to measure (float is always added, as the reference; default: "
                             f"{' '.join(DEFAULT_STUDENTS)}; granq+NAME: GranQ with an add-on of docs/addons.md)")
    parser.add_argument("--iters", type=int, default=0, help="timed iterations per student (default: 20 at "
                                                              "batch 16, 6 at batch 200; --quick 8 and 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per student first")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-format", choices=("trainer", "contiguous"), default="trainer",
                        help="trainer: the trainer's layout (channels_last teacher and student on the CPU); "
                             "contiguous: every model in the default layout, for comparison")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--deterministic", action="store_true",
                        help="the flags of deterministic = true (default: those of false, as runs default to)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of GranQ steps")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    parser.add_argument("--memory-worker", nargs=2, metavar=("SETTING", "STUDENT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(memory_worker(*args.memory_worker, torch.device(args.device), args.memory_format)))
        return 0
    args.iters_b16, args.iters_b200 = (8, 3) if args.quick else (20, 6)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.settings = args.settings or list(CPU_SETTINGS if args.device == "cpu" else SETTINGS)
    if args.device == "cuda" and args.students == list(DEFAULT_STUDENTS):
        args.students.append(GRAPHED)
    if args.device != "cuda" and GRAPHED in args.students:
        parser.error(f"--students {GRAPHED!r}: CUDA graphs need --device cuda")
    args.students = ["float"] + [name for name in dict.fromkeys(args.students) if name != "float"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = configure_backends(args.deterministic, device)  # as utils.runs.run does
    env = {**environment([device]), "backends": backends}
    print(describe(env), flush=True)
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory() as run_dir:
        for setting in args.settings:
            results.append(run_setting(setting, device, args, run_dir))
            print(f"  {setting}: done", file=sys.stderr, flush=True)
        print_table(results)
        if args.profile:
            profile_step(args.settings[0], "granq", device, run_dir, rows=25)
            if device.type == "cuda":  # a replay: what is left is the kernels themselves
                profile_step(args.settings[0], GRAPHED, device, run_dir, rows=25)
    finish(env, started, args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
