"""The GPU check: every check and figure of the GPU section of docs/speed.md, one step after the other.

    bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--results DIR] [--steps STEP ... | --only STEP]

Steps, each in its own process; a step that fails or runs out of time is reported and the next one runs. The
correctness probes it runs are in ``checks/``, the timings here:

1. ``exactness``: ``checks/exactness_probe.py``, compiled GranQ against eager value by value (fails where they
   differ);
2. ``cli``: ``checks/cli_eval.py``: a 2-epoch CIFAR-10 run of the command line with ``deterministic = true``, then
   ``--eval`` of its directory: the saved student must give the run's top-1 and top-5 exactly (on a synthetic
   test set labelled by the random teacher, so that a student's accuracy moves with its weights);
3. ``cli_compiled``: the same with ``quant_impl = compiled`` (no eager fallback): it must also run compiled;
4. ``graph_probe``: ``checks/graph_probe.py``: graphed against eager iterations, value by value, for every mode
   (on the CPU eager against eager, which checks the comparison only); fails where they differ;
5. ``train_step``: ``train_step.py``: seconds per iteration, peak memory and quant_path; CUDA: CIFAR-10
   (batch 16), CIFAR-100 (batch 200), ImageNet ResNet-18 and ResNet-50 (batch 16), the ``granq graphed``
   student included;
6. ``quantizer_speed``: ``quantizer_speed.py``;
7. ``eval_throughput``: ``eval_throughput.py``: the decoding and the cached test loader and the models; the
   cached batches must equal the decoded ones;
8. ``full_run``: the official CIFAR-10 W3A3 run (``CIFAR/cifar10_resnet20a.hocon``: 200 epochs x 200 iterations,
   batch 16, the option-A teacher) with ``cuda_graph = auto``, on the shared teacher weights and JPEG test set
   that ``benchmarks/prepare_gpu_data.sh`` copies into ``.gpu_data/`` (ignored by git; ``../shared`` is not
   beside the project on a GPU machine). It must finish within FULL_RUN_CAP seconds; if not, it is stopped and
   its JSON records the iterations done and the projected wall time, and the step fails. ``--quick``: 2 epochs
   of 2 iterations on the synthetic test set of ``cli`` (:func:`checks.cli_eval.labelled_test_set`).

On CUDA the whole check takes two commands of under 9 minutes each (docs/speed.md, GPU):
``--steps exactness cli cli_compiled graph_probe train_step quantizer_speed eval_throughput``, then
``--only full_run``; a later command keeps the other steps' records in ``gpu_check_DEVICE.json``.

Each step writes ``STEP_DEVICE.json`` (``STEP_quick_DEVICE.json`` with ``--quick``, so that a quick run never
replaces full figures) into ``--results``, else ``$RESULTS_DIR``, else ``benchmarks/results``; the steps'
output goes to ``gpu_check[_quick]_DEVICE.log`` there, and ``gpu_check[_quick]_DEVICE.json`` holds what each
step gave, rewritten after every step. Random teachers and synthetic data only: nothing is downloaded.
``--device cpu --quick`` runs each step small enough to check that the whole script works without a GPU.
The exit status is 1 where a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment  # noqa: E402
from checks.cli_eval import labelled_test_set  # noqa: E402

TARGET_SECONDS = 8 * 60  # on one H100
CIFAR10_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon")
CIFAR10A_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon")
GPU_DATA = os.path.join(ROOT, ".gpu_data")  # benchmarks/prepare_gpu_data.sh fills it
FULL_RUN_TEST_SET = os.path.join(GPU_DATA, "cifar10-test-jpeg", "test")
FULL_RUN_WEIGHTS = os.path.join(GPU_DATA, "weights", "akamaster_resnet20-12fca82f.th")
FULL_RUN_CAP = 480  # seconds: the run and its evaluations, so that `--only full_run` stays under 9 minutes
FULL_RUN_TARGET = 300  # seconds: the wall time a 200-epoch CIFAR-10 run on one H100 or H200 should stay within


class StepFailed(Exception):
    """A step's check did not hold; the message says which."""


class Check:
    """Steps run one after the other into one log and one summary JSON, ``NAME[_quick]_DEVICE.{log,json}``."""

    def __init__(self, device: str, quick: bool, results: str, keep_others: bool = False, name: str = "gpu_check",
                 order=None):
        self.device, self.quick, self.results = device, quick, results
        self.order = list(order if order is not None else STEPS)  # of the steps in the summary
        self.suffix = f"{'_quick' if quick else ''}_{device}"
        os.makedirs(results, exist_ok=True)
        self.log_path = os.path.join(results, f"{name}{self.suffix}.log")
        self.summary_path = os.path.join(results, f"{name}{self.suffix}.json")
        self.steps: list[dict] = []
        # --only / --steps: the records of the steps not run now stay, from the summary of an earlier command
        self.earlier: list[dict] = []
        if keep_others and os.path.isfile(self.summary_path):
            self.earlier = load(self.summary_path).get("steps", [])
        self.env = environment([torch.device(device)] if device == "cuda" else [])
        self.started = time.time()
        with open(self.log_path, "a" if keep_others else "w") as log:
            log.write(describe(self.env) + "\n")

    def json_path(self, step: str) -> str:
        return os.path.join(self.results, f"{step}{self.suffix}.json")

    def run(self, args: list[str], timeout: float, what: str, allowed=(0,)) -> str:
        """Run ``python args...`` into the log; return its stdout. Raises StepFailed on an exit status not in
        ``allowed`` or when it runs out of ``timeout`` seconds."""
        command = [sys.executable, *args]
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                        timeout=timeout, env=env)
            except subprocess.TimeoutExpired as expired:
                log.write(expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or "")
                raise StepFailed(f"{what} ran out of its {timeout:.0f} s") from None
            log.write(result.stdout)
        self.returncode = result.returncode
        if result.returncode not in allowed:
            raise StepFailed(f"{what} exited with {result.returncode}; see {self.log_path}")
        return result.stdout

    def step(self, name: str, function) -> None:
        print(f"[{len(self.steps) + 1}] {name} ...", flush=True)
        start, cpu_start = time.time(), _children_cpu_seconds()
        record = {"step": name}
        try:
            record.update({"status": "ok", **function(self)})  # a step may say it was skipped
        except StepFailed as failure:
            record.update(status="FAILED", reason=str(failure))
        except Exception as error:  # a step's output not as expected: report it, run the next step
            record.update(status="FAILED", reason=f"{type(error).__name__}: {error}".splitlines()[0])
        record["seconds"] = round(time.time() - start, 1)
        # CPU time of the step's processes: on a busy machine the wall clock alone says little about a step
        record["cpu_seconds"] = round(_children_cpu_seconds() - cpu_start, 1)
        self.steps.append(record)
        print(f"    {record['status']} in {record['seconds']} s: {record.get('reason') or record.get('result', '')}",
              flush=True)
        self.write_summary()

    def write_summary(self) -> None:
        now = {record["step"] for record in self.steps}
        steps = sorted([r for r in self.earlier if r["step"] not in now] + self.steps,
                       key=lambda r: self.order.index(r["step"]) if r["step"] in self.order else len(self.order))
        with open(self.summary_path, "w") as f:
            json.dump({"environment": self.env, "device": self.device, "quick": self.quick,
                       "seconds": round(time.time() - self.started, 1), "steps": steps}, f, indent=1)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- steps
def exactness(check: Check) -> dict:
    path = check.json_path("exactness_probe")
    check.run(["checks/exactness_probe.py", "--device", check.device, "--json", path]
              + (["--quick"] if check.quick else []), 240, "exactness_probe.py", allowed=(0, 1))
    result = load(path)
    setting = result["package_setting"]
    differ = sum(case["differ"] for case in result["cases"] if case["options"] == setting)
    if check.returncode == 1:
        raise StepFailed(f"compiled GranQ differs from eager in the setting the package uses ({setting}): "
                         f"{differ} values; see {path}")
    return {"json": path, "package_setting": setting, "values_differing": differ,
            "result": f"{setting}: {differ} values differ from eager"}


def cli_run(check: Check, quant_impl: str) -> dict:
    """``checks/cli_eval.py``: train 2 epochs through the command line, then ``--eval`` the run; the accuracies
    must be equal."""
    path = check.json_path("cli_run" if quant_impl == "auto" else f"cli_run_{quant_impl}")
    check.run(["checks/cli_eval.py", "--quant-impl", quant_impl, "--json", path]
              + (["--quick"] if check.quick else []), 480, "cli_eval.py", allowed=(0, 1))
    record = load(path)
    run, evaluated = record["run"], record["eval"]
    if record["failures"]:
        raise StepFailed("; ".join(record["failures"]))
    return {"json": path, "student_top1": run["student_top1"], "eval_top1": evaluated["student_top1"],
            "quant_path": run["quant_path"], "tf32": run["tf32"], "cudnn_benchmark": run["cudnn_benchmark"],
            "result": record["result"]}


def train_step(check: Check) -> dict:
    path = check.json_path("train_step")
    args = ["benchmarks/train_step.py", "--device", check.device, "--json", path]
    if check.quick:
        args += ["--quick", "--iters", "2"]
        if check.device == "cpu":  # the smallest setting and the GranQ student only
            args += ["--settings", "cifar10", "--students", "granq", "--no-memory"]
    check.run(args, 300, "train_step.py")
    rows = {}
    for r in load(path)["results"]:
        memory = r["memory"].get("granq", {}).get("peak_mib")
        rows[f"{r['setting']} b{r['batch']}"] = {"seconds": r["seconds"], "peak_mib": memory,
                                                 "quant_path": r["quant_path"]}
    text = "; ".join(f"{k}: granq {v['seconds']['granq']:.4f} s"
                     + (f", graphed {v['seconds']['granq graphed']:.4f} s" if "granq graphed" in v["seconds"] else "")
                     + (f", {v['peak_mib']:.0f} MiB" if v["peak_mib"] else "") for k, v in rows.items())
    return {"json": path, "settings": rows, "result": text}


def quantizer_speed(check: Check) -> dict:
    path = check.json_path("quantizer_speed")
    args = ["benchmarks/quantizer_speed.py", "--device", check.device, "--json", path]
    if check.quick:
        args += ["--quick"]
        if check.device == "cpu":
            args += ["--networks", "resnet20_cifar10", "--batches", "16", "--layouts", "channels_last",
                     "--repeats", "2"]
    check.run(args, 240, "quantizer_speed.py")
    rows = load(path)["rows"]
    paths = sorted({row["quant_path"] for row in rows})
    return {"json": path, "rows": len(rows), "quant_path": paths, "result": f"{len(rows)} shapes, quant_path {paths}"}


def eval_throughput(check: Check) -> dict:
    path = check.json_path("eval_throughput")
    check.run(["benchmarks/eval_throughput.py", "--device", check.device, "--json", path]
              + (["--quick"] if check.quick else []), 240, "eval_throughput.py")
    result = load(path)
    row = result["row"]
    if not row["exact"]:
        raise StepFailed(f"the cached loader's batches differ from the decoding loader's; see {path}")
    rates = {name: round(r["images_per_s"], 1) for name, r in result["results"].items()}
    return {"json": path, "images_per_s": rates, "cached_over_decode": row["ratio"], "exact": row["exact"],
            "build_s": row["build_s"], "cache_on": result["cache_on"], "quant_path": result["quant_path"],
            "result": ", ".join(f"{name} {rate} images/s" for name, rate in rates.items())
            + f"; cached/decode {row['ratio']}x, exact, cache on {result['cache_on']}"}


def graph_probe(check: Check) -> dict:
    path = check.json_path("graph_probe")
    args = ["checks/graph_probe.py", "--device", check.device, "--json", path]
    if check.quick and check.device == "cpu":  # one mode, small, eager quantizers: the comparison is what is checked
        args += ["--modes", "default", "--batch", "4", "--quant-impl", "eager", "--no-faults"]
    check.run(args, 400, "graph_probe.py", allowed=(0, 1))
    result = load(path)
    differing = {r.get("fault") or r["mode"]: len(r["differences"]) for r in result["results"]}
    if check.returncode == 1:
        raise StepFailed(f"graph_probe.py: {', '.join(result['failed'])} failed ({differing}); see {path}")
    compared = "graphed against eager" if result["graphed"] else "eager against eager (no CUDA: no graph)"
    modes = [r["mode"] for r in result["results"] if "fault" not in r]
    caught = [r["fault"] for r in result["results"] if "fault" in r]
    return {"json": path, "graphed": result["graphed"], "differences": differing,
            "result": f"{compared}: 0 values differ in {', '.join(modes)}"
                      + (f"; stand-ins caught: {', '.join(caught)}" if caught else "")}


def full_run(check: Check) -> dict:
    """The official CIFAR-10 W3A3 run with cuda_graph = auto: wall time and accuracies (quick: 2 x 2 iterations)."""
    with tempfile.TemporaryDirectory() as root:
        if check.quick:
            test_set, weights = labelled_test_set(root, 40)
            conf, sizes = CIFAR10_CONF, ["nEpochs=2", "iters_per_epoch=2", "batchSize=4", "nThreads=0"]
        else:
            if not (os.path.isdir(FULL_RUN_TEST_SET) and os.path.isfile(FULL_RUN_WEIGHTS)):
                raise StepFailed(f"{FULL_RUN_TEST_SET} or {FULL_RUN_WEIGHTS} is missing: run "
                                 f"`bash benchmarks/prepare_gpu_data.sh` beside ../shared/data first and take "
                                 f".gpu_data/ to the GPU machine")
            test_set, weights, conf, sizes = FULL_RUN_TEST_SET, FULL_RUN_WEIGHTS, CIFAR10A_CONF, ["nThreads=8"]
        sets = [f"save_path={root}/runs", f"dataPath={test_set}", f"teacher_weights={weights}", "cuda_graph=auto",
                f"eval_cache={root}/eval_cache", *sizes]
        args = ["CIFAR/main.py", "--conf_path", conf, "--id", "1", "--qw", "3", "--qa", "3"]
        for s in sets:
            args += ["--set", s]
        cap = 300 if check.quick else FULL_RUN_CAP
        start = time.time()
        try:
            summary = json.loads(check.run(args, cap, "the full run").strip().splitlines()[-1])
            record = {"finished": True}
        except StepFailed as failure:
            summary, record = None, {"finished": False, "reason": str(failure)}
        wall = time.time() - start
        metrics = _run_metrics(os.path.join(root, "runs"))
    o = {"epochs": 2, "iters_per_epoch": 2} if check.quick else {"epochs": 200, "iters_per_epoch": 200}
    record.update(config=os.path.relpath(conf, ROOT), wall_seconds=round(wall, 1), device=check.device,
                  iters_per_epoch=o["iters_per_epoch"], target_wall_seconds=FULL_RUN_TARGET, cap_seconds=cap)
    if summary is not None:
        record.update({key: summary.get(key) for key in ("epochs", "student_top1", "best_top1", "teacher_top1",
                                                         "cuda_graph", "device", "quant_path", "deterministic")})
    else:  # stopped at its cap: what it did, and what the whole would take at that pace
        done = len(metrics) * o["iters_per_epoch"]
        record.update(epochs=len(metrics), iterations_done=done, cuda_graph=None,
                      student_top1=metrics[-1].get("student_top1") if metrics else None,
                      best_top1=metrics[-1].get("best_top1") if metrics else None,
                      teacher_top1=metrics[-1].get("teacher_top1") if metrics else None,
                      projected_wall_seconds=round(wall * o["epochs"] * o["iters_per_epoch"] / done, 1) if done
                      else None)
    path = check.json_path("full_run")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    if not record["finished"]:
        raise StepFailed(f"stopped at its {cap} s cap after {record['epochs']} epochs ({record['iterations_done']} "
                         f"iterations); projected {record['projected_wall_seconds']} s; see {path}")
    return {"json": path, **{k: record[k] for k in ("wall_seconds", "student_top1", "best_top1", "cuda_graph")},
            "result": f"{record['epochs']} epochs in {record['wall_seconds']} s, top-1 {record['student_top1']:.2f} "
                      f"(best {record['best_top1']:.2f}, teacher {record['teacher_top1']:.2f}), cuda_graph "
                      f"{record['cuda_graph']}"}


def _run_metrics(save_path: str) -> list[dict]:
    """The epoch records of the one run directory under ``save_path`` (none if there is none yet)."""
    runs = [os.path.join(save_path, d) for d in os.listdir(save_path)] if os.path.isdir(save_path) else []
    path = os.path.join(runs[0], "metrics.jsonl") if runs else ""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


STEPS = {
    "exactness": exactness,
    "cli": lambda check: cli_run(check, "auto"),
    "cli_compiled": lambda check: cli_run(check, "compiled"),
    "graph_probe": graph_probe,
    "train_step": train_step,
    "quantizer_speed": quantizer_speed,
    "eval_throughput": eval_throughput,
    "full_run": full_run,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="every step small (a few minutes on a CPU)")
    parser.add_argument("--results", default=os.environ.get("RESULTS_DIR") or os.path.join(ROOT, "benchmarks",
                                                                                         "results"),
                        help="folder for the JSON files and the log (default: $RESULTS_DIR, else benchmarks/results)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--steps", nargs="+", choices=tuple(STEPS), help="default: all")
    chosen.add_argument("--only", choices=tuple(STEPS), help="run this one step on its own")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (--device cpu --quick checks the script on the CPU)")
    some = bool(args.only or args.steps)
    args.steps = [args.only] if args.only else args.steps or list(STEPS)
    check = Check(args.device, args.quick, os.path.abspath(args.results), keep_others=some)
    print(describe(check.env), flush=True)
    print(f"torch {torch.__version__}; results and log in {check.results}", flush=True)
    for name in args.steps:
        check.step(name, STEPS[name])
    total = time.time() - check.started
    check.write_summary()
    print(f"\nsummary ({args.device}{', quick' if args.quick else ''}), {total:.0f} s in all "
          f"({sum(r['cpu_seconds'] for r in check.steps):.0f} s of CPU time):")
    for record in check.steps:
        print(f"  {record['step']:16} {record['status']:6} {record['seconds']:7.1f} s  "
              f"{record.get('reason') or record.get('result', '')}")
    failed = [r["step"] for r in check.steps if r["status"] != "ok"]
    if args.device == "cuda" and not args.quick and total > TARGET_SECONDS:
        print(f"  note: {total:.0f} s is over the {TARGET_SECONDS} s this check is meant to take on one H100")
    print(f"FAILED: {', '.join(failed)}" if failed else "all steps passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
