"""Training throughput of CPU runs side by side: one run on every core against one run per core at once.

    python benchmarks/cpu_jobs.py [--iterations 150] [--json PATH]

Each run is ``CIFAR/main.py`` on CIFAR-10 ResNet-20 (option-A architecture, random teacher), W3A3 GranQ,
batch 16, one epoch that trains the student from the first iteration, no evaluation; the figure is the
iterations per second of its last progress line. First one run with PyTorch's default threads (every core),
then ``os.cpu_count()`` runs at once with ``OMP_NUM_THREADS=1`` each, as ``tools/reproduce.py --jobs N`` gives
them (utils.sweeps.local.cpu_threads). Needs the test set of ``../shared/data`` (or ``--data``), only for the
teacher's evaluation at the start. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish  # noqa: E402

RATE = re.compile(r"\(([\d.]+) it/s\)")


def start(folder: str, name: str, iterations: int, data: str, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, os.path.join(ROOT, "CIFAR", "main.py"), "--conf_path",
               os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon"), "--id", "1", "--qw", "3", "--qa", "3"]
    for override in ("act_mode=granq", "teacher_weights=random", "nEpochs=1", f"iters_per_epoch={iterations}",
                     "warmup_epochs=0", "batchSize=16", "eval_every=2", f"dataPath={data}", "nThreads=0",
                     f"save_path={os.path.join(folder, name)}", "eval_cache=off"):
        command += ["--set", override]
    log = open(os.path.join(folder, f"{name}.log"), "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def rate(folder: str, name: str) -> float:
    with open(os.path.join(folder, f"{name}.log")) as f:
        found = RATE.findall(f.read())
    if not found:
        sys.exit(f"error: no progress line in {os.path.join(folder, name + '.log')}")
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-test-jpeg",
                                                       "test"))
    parser.add_argument("--json", help="write the figures there")
    args = parser.parse_args()
    env = environment(["cpu"])
    print(describe(env))
    started = time.time()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        runs = [start(folder, "alone", args.iterations, args.data, None)]
        if runs[0].wait():
            sys.exit(f"error: the run failed; see {folder}/alone.log")
        alone = rate(folder, "alone")
        runs = [start(folder, f"side{i}", args.iterations, args.data, 1) for i in range(cores)]
        if any(run.wait() for run in runs):
            sys.exit("error: a side-by-side run failed")
        side = [rate(folder, f"side{i}") for i in range(cores)]
    print(f"one run on {cores} cores: {alone:.2f} it/s")
    print(f"{cores} runs at once, one thread each: {', '.join(f'{r:.2f}' for r in side)} it/s, "
          f"{sum(side):.2f} in all ({sum(side) / alone:.2f}x)")
    finish(env, started, args.json, {"args": vars(args), "alone_it_s": alone, "side_by_side_it_s": side,
                                     "ratio": sum(side) / alone})


if __name__ == "__main__":
    main()
