"""Several CIFAR-10 runs on one GPU: ``tools/reproduce.py --jobs K`` for K = 1, 2, 4, 8, with and without MPS.

    python benchmarks/gpu_jobs.py [--jobs 1 2 4 8] [--epochs 1] [--iterations 200] [--no-mps] [--json PATH]

For each K it writes a plan of K CIFAR-10 cells (option-A ResNet-20, W3A3 GranQ, seeds 1..K, the shared teacher
and JPEG test set of ``.gpu_data/``, see ``benchmarks/prepare_gpu_data.sh``; ``cuda_graph = auto``), shortened to
``--epochs`` x ``--iterations``, and runs it with ``tools/reproduce.py --jobs K --gpus 0``: every run on GPU 0.
Figures: the plan's wall time, and the iterations per second summed over the runs (each run's trained
iterations over its ``train_seconds`` in metrics.jsonl). Where ``nvidia-cuda-mps-control -d`` starts an MPS
daemon (pipe and log folders in a temporary folder, so nothing outside it changes), each K runs again with it,
and the daemon is stopped afterwards. Nothing here changes what ``--jobs`` does: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish  # noqa: E402

GPU_DATA = os.path.join(ROOT, ".gpu_data")
TEST_SET = os.path.join(GPU_DATA, "cifar10-test-jpeg", "test")
WEIGHTS = os.path.join(GPU_DATA, "weights", "akamaster_resnet20-12fca82f.th")


def write_plan(folder: str, k: int, args) -> str:
    sets = [f"dataPath={TEST_SET}", f"teacher_weights={WEIGHTS}", f"nEpochs={args.epochs}",
            f"iters_per_epoch={args.iterations}", "warmup_epochs=0", "nThreads=2", "cuda_graph=auto",
            f"eval_cache={os.path.join(folder, 'eval_cache')}"]
    path = os.path.join(folder, f"jobs{k}.hocon")
    with open(path, "w") as f:
        f.write(f'description = "{k} CIFAR-10 cells on one GPU"\nconfigs = ["CIFAR/cifar10_resnet20a.hocon"]\n'
                f"bits = [3]\nact_modes = [\"granq\"]\nseeds = {list(range(1, k + 1))}\nset = {json.dumps(sets)}\n"
                f'save_path = "{os.path.join(folder, "runs")}"\n')
    return path


def measure(k: int, args, env: dict, label: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        plan = write_plan(folder, k, args)
        start = time.time()
        result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "reproduce.py"), "--plan", plan,
                                 "--jobs", str(k), "--gpus", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if result.returncode != 0:
            raise RuntimeError(f"K = {k} ({label}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        rates, graphs = [], []
        for root, _, files in os.walk(os.path.join(folder, "runs")):
            if "metrics.jsonl" in files:
                with open(os.path.join(root, "metrics.jsonl")) as f:
                    records = [json.loads(line) for line in f if line.strip()]
                rates.append(len(records) * args.iterations / sum(r["train_seconds"] for r in records))
            if "summary.json" in files:
                with open(os.path.join(root, "summary.json")) as f:
                    graphs.append(json.load(f).get("cuda_graph"))
    return {"jobs": k, "mps": label == "mps", "plan_wall_seconds": round(wall, 1), "runs": len(rates),
            "summed_it_per_s": round(sum(rates), 1), "per_run_it_per_s": [round(r, 1) for r in rates],
            "cuda_graph": graphs}


def start_mps(folder: str) -> dict | None:
    """Environment of an MPS daemon started with its folders in ``folder``; None where none starts."""
    if shutil.which("nvidia-cuda-mps-control") is None:
        return None
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
    os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"])
    os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
    started = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, capture_output=True, text=True)
    return env if started.returncode == 0 else None


def stop_mps(env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=env, capture_output=True, text=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--no-mps", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it measures runs sharing one GPU")
    if not (os.path.isdir(TEST_SET) and os.path.isfile(WEIGHTS)):
        parser.error(f"{GPU_DATA} lacks the test set or the teacher: run bash benchmarks/prepare_gpu_data.sh first")
    info = environment([torch.device("cuda")])
    print(describe(info), flush=True)
    started = time.time()
    rows = []
    for k in args.jobs:
        rows.append(measure(k, args, dict(os.environ), "plain"))
        print(json.dumps(rows[-1]), flush=True)
    mps = None
    if not args.no_mps:
        with tempfile.TemporaryDirectory() as folder:
            env = start_mps(folder)
            mps = env is not None
            if env is None:
                print("MPS: nvidia-cuda-mps-control -d did not start a daemon here; measured without it only")
            else:
                try:
                    for k in args.jobs:
                        rows.append(measure(k, args, env, "mps"))
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    stop_mps(env)
    print(f"\n{'K':>3} {'MPS':>4} {'plan wall s':>12} {'summed it/s':>12}")
    for r in rows:
        mps_label = "yes" if r["mps"] else "no"
        print(f"{r['jobs']:>3} {mps_label:>4} {r['plan_wall_seconds']:>12} {r['summed_it_per_s']:>12}")
    finish(info, started, args.json, {"args": vars(args), "mps_available": mps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
