"""The check that settles whether CUDA graphs can be the default, in one window of GPU time.

    bash benchmarks/gpu_verify.sh [--device cuda|cpu] [--quick] [--results DIR] [--only STEP]

It prints the torch, CUDA and GPU versions, then runs six steps, each in its own process (a step that breaks its
CUDA context cannot take the others with it; the fallback step also leaves its process making no further capture):

1. ``self_check``: the self-check of the default CIFAR-10 trainer (batch 16, ``deterministic = true``) with
   ``cuda_graph = on``: every kind of iteration graphed against eager, bit for bit;
2. ``fallback``: a step that calls ``.item()`` inside the capture (torch refuses it), then 20 eager steps: the
   thread is on the default stream, ``torch.cuda.empty_cache()`` works, allocated memory stays flat;
3. ``channel_setup``: a fresh trainer with ``act_mode = channel`` and ``cuda_graph = auto`` gets through setup
   (its self-check included);
4. ``graph_probe``: ``checks/graph_probe.py`` for every mode, deterministic, then ``--nondeterministic`` for the
   default;
5. ``off_vs_on``: 2 epochs of 20 iterations through the command line with ``cuda_graph = off`` and ``on``
   (``deterministic = true``), both summaries recorded; on the shared teacher and test set where
   ``benchmarks/prepare_gpu_data.sh`` put them in ``.gpu_data/``, else a fitted random teacher and a synthetic
   test set;
6. ``step_time``: graphed against eager seconds per iteration, CIFAR-10 at batch 16 (medians).

On CUDA it is meant to take under 8 minutes on one H100 or H200. ``--device cpu --quick`` runs the same script on
the CPU, every step small: what needs CUDA (a capture, stream and memory checks, timings of a graph) is skipped
and the step says so. It writes ``gpu_verify[_quick]_DEVICE.json`` into ``--results`` (else ``$RESULTS_DIR``, else
``benchmarks/results``), rewritten after each step, and the steps' output to ``gpu_verify[_quick]_DEVICE.log``.
The exit status is 1 where a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.gpu_check import CIFAR10_CONF, Check, StepFailed, labelled_test_set, load  # noqa: E402

GPU_DATA = os.path.join(ROOT, ".gpu_data")
SHARED_TEST_SET = os.path.join(GPU_DATA, "cifar10-test-jpeg", "test")
SHARED_WEIGHTS = os.path.join(GPU_DATA, "weights", "akamaster_resnet20-12fca82f.th")
CIFAR10A_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon")
TARGET_SECONDS = 8 * 60
SKIPPED = "skipped: needs CUDA"


def versions() -> dict:
    """torch, CUDA, cuDNN and the GPU, as this process sees them."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def make_trainer(device: torch.device, quick: bool, *sets: str):
    """The default CIFAR-10 trainer (random teacher), as a run builds it; backends set as the run sets them."""
    from utils.models import build_teacher
    from utils.runs.config import load_options
    from utils.system.devices import configure_backends
    from utils.training.trainer import Trainer

    options = load_options(CIFAR10_CONF, [f"batchSize={4 if quick else 16}", "teacher_weights=random",
                                          "nEpochs=2", "warmup_epochs=1", *sets])
    configure_backends(options.deterministic, device)
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    return Trainer(options, teacher, None, device, tempfile.mkdtemp(), {"id": 0, "seed": 1})


# ------------------------------------------------------------------------------------ steps (in-process)
def self_check(device: torch.device, quick: bool) -> dict:
    from utils.training.graphs import use_cuda_graphs

    trainer = make_trainer(device, quick, "deterministic=true", "cuda_graph=on")
    decision = use_cuda_graphs(trainer, "on")  # raises (the step fails) where the self-check differs
    return {"cuda_graph": decision, "result": f"cuda_graph = on: {decision}, bit for bit"}


def fallback(device: torch.device, quick: bool) -> dict:
    from utils.training import graphs

    trainer = make_trainer(device, quick, "cuda_graph=auto", "warmup_epochs=0")
    step = trainer.step

    def synchronising_step(train_student=True):
        values = step(train_student)
        values.sum().item()  # a host synchronisation, which a capture refuses
        return values

    trainer.step = synchronising_step
    trainer.graphed_step = graphs.GraphedStep(trainer, warmup=1, on_failure=graphs._fall_back(trainer, "auto"))
    trainer.graphed_step(True)  # eager, on the side stream
    trainer.graphed_step(True)  # the capture fails: this iteration runs eager
    trainer.step = step
    if trainer.graphed_step is not None or graphs.capture_failed() is None:
        raise StepFailed(f"the capture did not fail as expected: {trainer.meta.get('cuda_graph')}")
    allocated = []
    for i in range(20):
        trainer.step(True)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    default = torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.empty_cache()
    growth = allocated[-1] - allocated[4]
    if not default or growth > 1 << 20:
        raise StepFailed(f"after the failed capture: default stream {default}, allocated memory grew by {growth} "
                         f"bytes over 15 eager steps")
    return {"cuda_graph": trainer.meta["cuda_graph"], "default_stream": default, "allocated_bytes": allocated,
            "result": f"{trainer.meta['cuda_graph']}; 20 eager steps on the default stream, empty_cache works, "
                      f"allocated memory {allocated[4]} -> {allocated[-1]} bytes"}


def channel_setup(device: torch.device, quick: bool) -> dict:
    from utils.training.graphs import use_cuda_graphs

    trainer = make_trainer(device, quick, "act_mode=channel", "act_range_epochs=1", "cuda_graph=auto")
    decision = use_cuda_graphs(trainer, "auto")
    if device.type == "cuda" and decision != "graphed":
        raise StepFailed(f"act_mode = channel did not graph: {decision}")
    return {"cuda_graph": decision, "result": f"setup done: cuda_graph {decision}"}


def step_time(device: torch.device, quick: bool) -> dict:
    from utils.training.graphs import GraphedStep

    seconds = {}
    for name, mode in (("eager", "off"), ("graphed", "on")):
        trainer = make_trainer(device, False, f"cuda_graph={mode}", "warmup_epochs=0")
        step = GraphedStep(trainer) if mode == "on" else trainer.step
        times = []
        for i in range(40):
            trainer.set_learning_rates(1, i)
            torch.cuda.synchronize()
            start = time.perf_counter()
            step(True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[10:])  # after warm-up and capture
    return {"seconds": seconds, "speedup": seconds["eager"] / seconds["graphed"],
            "result": f"eager {seconds['eager'] * 1e3:.2f} ms, graphed {seconds['graphed'] * 1e3:.2f} ms per "
                      f"iteration ({seconds['eager'] / seconds['graphed']:.1f}x)"}


IN_PROCESS = {"self_check": self_check, "fallback": fallback, "channel_setup": channel_setup, "step_time": step_time}


# ------------------------------------------------------------------------------ steps (other processes)
def graph_probe(check: Check) -> dict:
    results = {}
    quick_cpu = ["--modes", "channel", "--batch", "4", "--quant-impl", "eager", "--no-faults"]
    for label, extra in (("deterministic", quick_cpu if check.quick else []),
                         ("nondeterministic", ["--nondeterministic", "--modes", "default", "--no-faults"]
                          + (["--batch", "4"] if check.quick else []))):
        path = check.json_path(f"graph_probe_{label}")
        check.run(["checks/graph_probe.py", "--device", check.device, "--json", path, *extra], 300,
                  f"graph_probe.py ({label})", allowed=(0, 1))
        result = load(path)
        results[label] = {"failed": result["failed"], "graphed": result["graphed"]}
        if check.returncode == 1:
            raise StepFailed(f"graph_probe.py ({label}): {', '.join(result['failed'])} failed; see {path}")
    return {"probes": results, "result": ("graphed" if results["deterministic"]["graphed"] else "eager (no CUDA)")
            + " against eager: no value differs, deterministic and not"}


def off_vs_on(check: Check) -> dict:
    cuda = check.device == "cuda"
    summaries = {}
    with tempfile.TemporaryDirectory() as root:
        if os.path.isdir(SHARED_TEST_SET) and os.path.isfile(SHARED_WEIGHTS) and not check.quick:
            conf, test_set, weights = CIFAR10A_CONF, SHARED_TEST_SET, SHARED_WEIGHTS
        else:
            conf, (test_set, weights) = CIFAR10_CONF, labelled_test_set(root, 40 if check.quick else 400)
        for mode in ("off", "on" if cuda else "auto"):  # on the CPU `on` is refused: auto runs eager there
            sets = [f"save_path={root}/{mode}", f"dataPath={test_set}", f"teacher_weights={weights}", "nEpochs=2",
                    f"iters_per_epoch={2 if check.quick else 20}", f"batchSize={4 if check.quick else 16}",
                    "warmup_epochs=1", "deterministic=true", f"cuda_graph={mode}", f"eval_cache={root}/eval_cache",
                    f"nThreads={0 if check.quick else 4}", "log_interval=10"]
            args = ["CIFAR/main.py", "--conf_path", conf, "--id", "1", "--qw", "3", "--qa", "3"]
            for s in sets:
                args += ["--set", s]
            summary = json.loads(check.run(args, 300, f"the cuda_graph = {mode} run").strip().splitlines()[-1])
            summaries[mode] = {key: summary.get(key) for key in ("cuda_graph", "student_top1", "best_top1",
                                                                 "teacher_top1", "student_sha256", "seconds")}
    if cuda and summaries["on"]["cuda_graph"] != "graphed":
        raise StepFailed(f"cuda_graph = on ran {summaries['on']['cuda_graph']}")
    return {"summaries": summaries, "config": os.path.relpath(conf, ROOT),
            "result": "; ".join(f"{mode}: {s['cuda_graph']}, top-1 {s['student_top1']:.2f}, {s['seconds']:.1f} s"
                                for mode, s in summaries.items())}


NEEDS_CUDA = {"self_check": "no capture on the CPU (tests/unit/test_graphs.py checks the self-check with stand-ins)",
              "fallback": "no capture on the CPU (tests/unit/test_graphs.py covers a capture that fails at its end "
                          "with a stand-in)",
              "step_time": "no graph on the CPU"}


def in_process(name: str):
    def step(check: Check) -> dict:
        if check.device != "cuda" and name in NEEDS_CUDA:
            return {"status": SKIPPED, "result": NEEDS_CUDA[name]}
        path = check.json_path(f"gpu_verify_{name}")
        args = ["benchmarks/gpu_verify.py", "--step", name, "--device", check.device, "--json", path]
        check.run(args + (["--quick"] if check.quick else []), 300, name)
        return load(path)
    return step


STEPS = {"self_check": in_process("self_check"), "fallback": in_process("fallback"),
         "channel_setup": in_process("channel_setup"), "graph_probe": graph_probe, "off_vs_on": off_vs_on,
         "step_time": in_process("step_time")}


def run_one(name: str, device: str, quick: bool, path: str) -> int:
    """Run step ``name`` in this process and write its record (status, result, figures) to ``path``."""
    from utils.system.errors import UserError

    try:
        record = IN_PROCESS[name](torch.device(device), quick)
    except (StepFailed, UserError) as failure:
        print(f"{name}: {failure}", file=sys.stderr)
        return 1
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="every step small, for the CPU")
    parser.add_argument("--results", default=os.environ.get("RESULTS_DIR") or os.path.join(ROOT, "benchmarks",
                                                                                         "results"))
    parser.add_argument("--only", choices=tuple(STEPS), help="run this one step")
    parser.add_argument("--step", choices=tuple(IN_PROCESS), help=argparse.SUPPRESS)  # one step, in this process
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (--device cpu --quick checks the script on the CPU)")
    if args.step:
        return run_one(args.step, args.device, args.quick, args.json)
    check = Check(args.device, args.quick, os.path.abspath(args.results), keep_others=bool(args.only),
                  name="gpu_verify", order=STEPS)
    check.env["versions"] = versions()
    print(" ".join(f"{key} {value}" for key, value in check.env["versions"].items()), flush=True)
    for name in [args.only] if args.only else STEPS:
        check.step(name, STEPS[name])
    total = time.time() - check.started
    check.write_summary()
    failed = [r["step"] for r in check.steps if r["status"] != "ok" and not r["status"].startswith("skipped")]
    skipped = [r["step"] for r in check.steps if r["status"].startswith("skipped")]
    if args.device == "cuda" and not args.quick and total > TARGET_SECONDS:
        print(f"note: {total:.0f} s is over the {TARGET_SECONDS} s this check is meant to take")
    print(f"FAILED: {', '.join(failed)}" if failed else
          f"all steps passed{f' ({len(skipped)} skipped: they need CUDA)' if skipped else ''} in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
