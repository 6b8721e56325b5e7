"""The GPU check: every check and figure of the GPU section of docs/speed.md, one step after the other.

    bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--results DIR]

Steps, each in its own process; a step that fails or runs out of time is reported and the next one runs:

1. ``exactness``: ``exactness_probe.py``, compiled GranQ against eager value by value (fails where they differ);
2. ``cli``: a 2-epoch CIFAR-10 run of the command line with ``deterministic = true``, then ``--eval`` of its
   directory: the saved student must give the run's top-1 and top-5 exactly. The teacher is random and saved
   to a file, its BatchNorm statistics and last layer fitted to a synthetic test set (an ImageFolder made in a
   temporary folder) that is labelled with its own predictions, so that a student's accuracy is neither
   chance nor 100 % and moves with its weights;
3. ``cli_compiled``: the same with ``granq_impl = compiled`` (no eager fallback): it must also run compiled;
4. ``train_step``: ``train_step.py``: seconds per iteration, peak memory and granq_path; CUDA: CIFAR-10
   (batch 16), CIFAR-100 (batch 200), ImageNet ResNet-18 and ResNet-50 (batch 16);
5. ``quantizer_speed``: ``quantizer_speed.py``;
6. ``eval_throughput``: ``eval_throughput.py``: the decoding and the cached test loader and the models; the
   cached batches must equal the decoded ones.

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

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment  # noqa: E402

TARGET_SECONDS = 8 * 60  # on one H100
CIFAR10_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon")


class StepFailed(Exception):
    """A step's check did not hold; the message says which."""


class Check:
    def __init__(self, device: str, quick: bool, results: str):
        self.device, self.quick, self.results = device, quick, results
        self.suffix = f"{'_quick' if quick else ''}_{device}"
        os.makedirs(results, exist_ok=True)
        self.log_path = os.path.join(results, f"gpu_check{self.suffix}.log")
        self.summary_path = os.path.join(results, f"gpu_check{self.suffix}.json")
        self.steps: list[dict] = []
        self.env = environment([torch.device(device)] if device == "cuda" else [])
        self.started = time.time()
        with open(self.log_path, "w") as log:
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
            record.update(status="ok", **function(self))
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
        with open(self.summary_path, "w") as f:
            json.dump({"environment": self.env, "device": self.device, "quick": self.quick,
                       "seconds": round(time.time() - self.started, 1), "steps": self.steps}, f, indent=1)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- steps
def exactness(check: Check) -> dict:
    path = check.json_path("exactness_probe")
    check.run(["benchmarks/exactness_probe.py", "--device", check.device, "--json", path]
              + (["--quick"] if check.quick else []), 240, "exactness_probe.py", allowed=(0, 1))
    result = load(path)
    setting = result["package_setting"]
    differ = sum(case["differ"] for case in result["cases"] if case["options"] == setting)
    if check.returncode == 1:
        raise StepFailed(f"compiled GranQ differs from eager in the setting the package uses ({setting}): "
                         f"{differ} values; see {path}")
    return {"json": path, "package_setting": setting, "values_differing": differ,
            "result": f"{setting}: {differ} values differ from eager"}


def labelled_test_set(root: str, count: int) -> tuple[str, str]:
    """A CIFAR-10 ImageFolder of ``count`` blocky 32x32 images labelled by a random teacher fitted to them,
    and that teacher's weights file; returns (folder, weights)."""
    from PIL import Image
    from torchvision import transforms

    from utils.data.loaders import NORMALIZATION
    from utils.models import build_teacher

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.NEAREST)
                for _ in range(count)]
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*NORMALIZATION["cifar10"])])
    images = torch.stack([to_input(p) for p in pictures])
    torch.manual_seed(0)
    teacher, _ = build_teacher("resnet20_cifar10", "random")
    with torch.no_grad():
        for module in teacher.modules():  # BatchNorm statistics of these images: one average over them
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        teacher.train()(images)
        teacher.eval()
        features = []
        handle = teacher.output.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
        teacher(images)
        handle.remove()
        # The last layer centred and scaled on these images, so that the predictions spread over the classes.
        weight = torch.randn(10, features[0].shape[1]) / (features[0].std(0) + 1e-6)
        teacher.output.weight.copy_(weight)
        teacher.output.bias.copy_(-weight @ features[0].mean(0))
        labels = teacher(images).argmax(1).tolist()
    folder = os.path.join(root, "test")
    for c in range(10):
        os.makedirs(os.path.join(folder, f"class{c}"))
    for i, (picture, label) in enumerate(zip(pictures, labels)):
        picture.save(os.path.join(folder, f"class{label}", f"{i:04d}.png"))
    weights = os.path.join(root, "teacher.pth")
    torch.save(teacher.state_dict(), weights)
    return folder, weights


def cli_run(check: Check, granq_impl: str) -> dict:
    """Train 2 epochs through the command line, then ``--eval`` the run: the accuracies must be equal."""
    quick = check.quick
    with tempfile.TemporaryDirectory() as root:
        test_set, weights = labelled_test_set(root, 40 if quick else 400)
        # the evaluation cache too goes with the temporary folder: nothing is left in ~/.cache
        sets = [f"save_path={root}/runs", f"dataPath={test_set}", f"teacher_weights={weights}", "nEpochs=2",
                f"iters_per_epoch={2 if quick else 20}", f"batchSize={4 if quick else 16}", "warmup_epochs=0",
                "lr_S=1e-5", "deterministic=true", f"granq_impl={granq_impl}", "test_batch_size=100",
                f"nThreads={0 if quick else 4}", f"eval_cache={root}/eval_cache"]
        # 6 bits: the student agrees with its teacher on part of the images only
        args = ["CIFAR/main.py", "--conf_path", CIFAR10_CONF, "--id", "1", "--qw", "6", "--qa", "6"]
        for s in sets:
            args += ["--set", s]
        run = json.loads(check.run(args, 300, "the 2-epoch run").strip().splitlines()[-1])
        evaluated = json.loads(check.run(["CIFAR/main.py", "--eval", run["run_dir"]], 180, "--eval of the run")
                               .strip().splitlines()[-1])
    record = {"run": run, "eval": evaluated}
    path = check.json_path("cli_run" if granq_impl == "auto" else f"cli_run_{granq_impl}")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    same = (evaluated["student_top1"], evaluated["student_top5"]) == (run["student_top1"], run["student_top5"])
    summary = (f"top-1 {run['student_top1']:.2f} / {evaluated['student_top1']:.2f} (run / --eval), teacher "
               f"{run['teacher_top1']:.2f}, granq_path {run['granq_path']}, deterministic {run['deterministic']} / "
               f"{evaluated['deterministic']}")
    if not same:
        raise StepFailed(f"--eval differs from the run: {summary}; top-5 {run['student_top5']} / "
                         f"{evaluated['student_top5']}")
    if not (run["deterministic"] and evaluated["deterministic"]):
        raise StepFailed(f"deterministic = true was not in effect: {summary}")
    if granq_impl == "compiled" and run["granq_path"] != "compiled":
        raise StepFailed(f"granq_impl = compiled did not run compiled: {run['granq_path']}")
    return {"json": path, "student_top1": run["student_top1"], "eval_top1": evaluated["student_top1"],
            "granq_path": run["granq_path"], "tf32": run["tf32"], "cudnn_benchmark": run["cudnn_benchmark"],
            "result": summary}


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
                                                 "granq_path": r["granq_path"]}
    text = "; ".join(f"{k}: granq {v['seconds']['granq']:.4f} s" + (f", {v['peak_mib']:.0f} MiB" if v["peak_mib"]
                                                                   else "") for k, v in rows.items())
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
    paths = sorted({row["granq_path"] for row in rows})
    return {"json": path, "rows": len(rows), "granq_path": paths, "result": f"{len(rows)} shapes, granq_path {paths}"}


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
            "build_s": row["build_s"], "cache_on": result["cache_on"], "granq_path": result["granq_path"],
            "result": ", ".join(f"{name} {rate} images/s" for name, rate in rates.items())
            + f"; cached/decode {row['ratio']}x, exact, cache on {result['cache_on']}"}


STEPS = {
    "exactness": exactness,
    "cli": lambda check: cli_run(check, "auto"),
    "cli_compiled": lambda check: cli_run(check, "compiled"),
    "train_step": train_step,
    "quantizer_speed": quantizer_speed,
    "eval_throughput": eval_throughput,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="every step small (a few minutes on a CPU)")
    parser.add_argument("--results", default=os.environ.get("RESULTS_DIR") or os.path.join(ROOT, "benchmarks",
                                                                                         "results"),
                        help="folder for the JSON files and the log (default: $RESULTS_DIR, else benchmarks/results)")
    parser.add_argument("--steps", nargs="+", choices=tuple(STEPS), default=list(STEPS), help="default: all")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (--device cpu --quick checks the script on the CPU)")
    check = Check(args.device, args.quick, os.path.abspath(args.results))
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
