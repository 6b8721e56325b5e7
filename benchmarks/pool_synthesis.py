"""Seconds per synthesis step of a pool: one Adam step on a batch of images (the teacher's forward and backward pass
and the losses of docs/methods.md), and what a whole pool costs at that rate.

    python benchmarks/pool_synthesis.py [--conf CONFIG] [--teacher-weights PATH|random] [--batch 256] [--steps 8]
                                        [--repeats 3] [--set key=value ...] [--device cpu|cuda] [--json PATH]

A step is timed as the difference between a batch of ``2 + steps`` steps and one of 2 (the setup and the two
measurements of a batch cancel), divided by ``steps``; the figure is the median over ``--repeats`` such pairs. The
default config is the option-A ResNet-20 (CIFAR-10) with its settings of the pool keys; ``--set`` changes them
(``pool_aug_prob=0.5``, ``pool_lbns_weight=0.02``, ...). Nothing is written to the pool cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish, synchronize  # noqa: E402
from utils.models import build_teacher  # noqa: E402
from utils.runs.config import load_options  # noqa: E402
from utils.training.pools import Synthesis, check_pool_options  # noqa: E402

SHARED_TEACHER = os.path.join(os.path.dirname(ROOT), "shared", "data", "weights", "akamaster_resnet20-12fca82f.th")


def batch_seconds(synthesis: Synthesis, batch: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    synthesis.batch(0, batch)
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", default=os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon"))
    parser.add_argument("--teacher-weights", default=SHARED_TEACHER if os.path.isfile(SHARED_TEACHER) else "random")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    started = time.time()
    device = torch.device(args.device)
    env = environment([device] if device.type == "cuda" else [])
    print(describe(env), flush=True)
    options = load_options(args.conf, ["image_source=pool", f"pool_batch={args.batch}", *args.set])
    teacher, source = build_teacher(options.network, args.teacher_weights)
    runs = {}
    for steps in (2, 2 + args.steps):
        spec = check_pool_options(load_options(args.conf, ["image_source=pool", f"pool_batch={args.batch}",
                                                           f"pool_iters={steps}", *args.set]))
        runs[steps] = Synthesis(spec, teacher, device, show_progress=False)
    batch_seconds(runs[2], args.batch, device)  # untimed: allocator, caches
    per_step = []
    for _ in range(args.repeats):
        short, long = (batch_seconds(runs[steps], args.batch, device) for steps in runs)
        per_step.append((long - short) / args.steps)
    for synthesis in runs.values():
        synthesis.close()
    seconds = statistics.median(per_step)
    spec = check_pool_options(options)
    pool_hours = seconds * spec.pool_iters * len(spec.batches) / 3600  # the last, smaller batch counted whole
    print(f"{options.network} ({source}), batch {args.batch}, {device.type}: {seconds:.3f} s per synthesis step "
          f"(median of {args.repeats}: {', '.join(f'{s:.3f}' for s in per_step)}); a pool of {spec.pool_size} "
          f"images x {spec.pool_iters} steps at this rate: {pool_hours:.2f} h")
    finish(env, started, args.json, {"args": vars(args), "network": options.network, "teacher_weights": source,
                                     "seconds_per_step": seconds, "samples": per_step,
                                     "pool_hours_at_this_rate": pool_hours})
    return 0


if __name__ == "__main__":
    sys.exit(main())
