"""Graphed against eager training iterations, value by value, for every mode the CUDA graph must cover.

    python checks/graph_probe.py [--device cuda|cpu] [--modes ...] [--nondeterministic] [--json PATH]

For each mode (the default loss, each add-on term of ``student_losses``, ``student_input_filter = lowpass``,
``act_mode = layerwise`` and ``channel``, their ranges tracked, then frozen, and training on a pool of synthetic images
alone and with SynQ's terms) and each kind of iteration its run has (warm-up, student step, ranges tracked), it runs
:func:`utils.training.graphs.self_check`: from one saved state, a few eager iterations, then as many through
:class:`~utils.training.graphs.GraphedStep` (warm-up, capture, replays), and prints every value that differs: student,
generator, both optimizers' states, random states, recorded values.
``deterministic = true`` (the default here) asks for equality bit for bit; ``--nondeterministic`` for the
tolerance of ``cuda_graph = auto`` without it.

Then it checks the check: stand-ins for captures that change what is computed (latents that repeat, learning
rates frozen at their first value, ranges that stop updating) run eagerly in place of the graph, and each must
be reported as differing.

Without CUDA no graph can be captured: the probe says so, compares eager against eager (which must agree) and
runs the stand-ins, so the comparison is exercised; it never reports a graphed result there.
The exit status is 1 where graphed iterations differ from eager ones or a stand-in goes unnoticed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment  # noqa: E402
from quantization_utils import set_act_tracking  # noqa: E402
from utils.models import build_teacher  # noqa: E402
from utils.runs.config import load_options  # noqa: E402
from utils.system.devices import configure_backends  # noqa: E402
from utils.training.graphs import (  # noqa: E402
    CHECK_ITERATIONS,
    TOLERANCE,
    WARMUP_ITERATIONS,
    GraphedStep,
    iteration_kinds,
    self_check,
)
from utils.training.pools import run_pool  # noqa: E402
from utils.training.trainer import Trainer  # noqa: E402

CIFAR10_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon")
# Two epochs each: the first a warm-up (generator only), the second with the student step; layerwise tracks its
# ranges during a student epoch, then freezes them.
BASE = ["nEpochs=2", "warmup_epochs=1", "teacher_weights=random"]
MODES = {
    "default": [],
    "attention": ["student_losses=[kd, attention]"],
    "cam": ["student_losses=[kd, cam]"],
    "reliable_ce": ["student_losses=[kd, reliable_ce]"],
    "pseudo_label": ["student_losses=[kd, pseudo_label]"],
    "lowpass": ["student_input_filter=lowpass"],
    "layerwise": ["act_mode=layerwise", "warmup_epochs=0", "act_range_epochs=1"],
    "channel": ["act_mode=channel", "warmup_epochs=0", "act_range_epochs=1"],
    # a small pool synthesised in memory (two steps): no generator, the draws and crops from the noise stream
    "pool": ["image_source=pool", "pool_size=32", "pool_batch=32", "pool_iters=2", "pool_cache=off"],
    "pool_synq": ["image_source=pool", "pool_size=32", "pool_batch=32", "pool_iters=2", "pool_cache=off",
                  "student_losses=[kd, cam, reliable_ce]", "student_input_filter=lowpass"],
}


class RepeatedLatents:
    """A stand-in that draws the latents and labels of its first iteration again every time."""

    def __init__(self, trainer):
        self.trainer, self.state = trainer, None

    def __call__(self, train_student=True):
        if self.state is None:
            self.state = self.trainer.noise.get_state()
        else:
            self.trainer.noise.set_state(self.state)
        return self.trainer.step(train_student)


class FrozenLearningRates:
    """A stand-in whose learning rates stay those of its first iteration, as a float captured into a graph."""

    def __init__(self, trainer):
        self.trainer, self.rates = trainer, None

    def __call__(self, train_student=True):
        groups = [g for opt in (self.trainer.opt_S, self.trainer.opt_G) for g in opt.param_groups]
        if self.rates is None:
            self.rates = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]
        for group, rate in zip(groups, self.rates):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].copy_(rate)
            else:
                group["lr"] = rate
        return self.trainer.step(train_student)


class FrozenRanges:
    """A stand-in whose activation ranges stop updating after its first iteration (a hook that no longer runs)."""

    def __init__(self, trainer):
        self.trainer, self.calls = trainer, 0

    def __call__(self, train_student=True):
        if self.calls:
            set_act_tracking(self.trainer.student, False)
        self.calls += 1
        return self.trainer.step(train_student)


# name -> (stand-in, the mode it runs in)
FAULTS = {"repeated latents": (RepeatedLatents, "default"), "frozen learning rate": (FrozenLearningRates, "default"),
          "ranges no longer updated": (FrozenRanges, "layerwise")}


def make_trainer(mode: str, device: torch.device, run_dir: str, deterministic: bool, batch: int,
                 quant_impl: str = "auto") -> Trainer:
    options = load_options(CIFAR10_CONF, [*BASE, *MODES[mode], f"batchSize={batch}", f"quant_impl={quant_impl}",
                                          f"deterministic={str(deterministic).lower()}"])
    configure_backends(options.deterministic, device)
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    return Trainer(options, teacher, None, device, run_dir, {"id": 0, "seed": 1}, run_pool(options, teacher, device))


def probe(mode: str, candidate, device, run_dir, args) -> dict:
    trainer = make_trainer(mode, device, run_dir, not args.nondeterministic, args.batch, args.quant_impl)
    kinds = iteration_kinds(trainer)
    tolerance = TOLERANCE if args.nondeterministic else 0.0
    start = time.time()
    try:
        differences = self_check(trainer, lambda: candidate(trainer), kinds, tolerance=tolerance)
        error = None
    except Exception as failure:  # a capture error is a result too
        differences, error = [], f"{type(failure).__name__}: {str(failure).strip().splitlines()[0]}"
    return {"mode": mode, "kinds": [list(k) for k in kinds], "iterations_per_kind": WARMUP_ITERATIONS
            + CHECK_ITERATIONS, "tolerance": tolerance, "differences": differences, "error": error,
            "seconds": round(time.time() - start, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    parser.add_argument("--nondeterministic", action="store_true",
                        help=f"deterministic = false: compare within the tolerance {TOLERANCE:g}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quant-impl", default="auto", choices=("auto", "eager", "compiled"))
    parser.add_argument("--no-faults", action="store_true", help="skip the stand-ins that the check must catch")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    env = environment([device] if device.type == "cuda" else [])
    print(describe(env), flush=True)
    graphed = device.type == "cuda"
    if graphed:
        candidate, compared = GraphedStep, "graphed against eager"
    else:
        candidate, compared = (lambda trainer: trainer.step), "eager against eager"
        print("no CUDA: CUDA graphs cannot be captured here. Comparing eager against eager (the comparison "
              "itself, which must find nothing) and the stand-ins it must catch; no graphed result.", flush=True)
    results, failed = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        for mode in args.modes:
            result = {**probe(mode, candidate, device, run_dir, args), "compared": compared}
            results.append(result)
            found = result["error"] or (f"{len(result['differences'])} values differ" if result["differences"]
                                        else "0 values differ")
            print(f"{mode:13} {compared}: {found} ({len(result['kinds'])} kind(s), {result['seconds']} s)",
                  flush=True)
            for line in result["differences"]:
                print(f"    {line}")
            if result["error"] or result["differences"]:
                failed.append(mode)
        if not args.no_faults:
            for name, (stand_in, mode) in FAULTS.items():
                result = {**probe(mode, stand_in, device, run_dir, args), "fault": name, "compared": "stand-in"}
                results.append(result)
                caught = bool(result["differences"])
                print(f"{name:24} in {mode}: {'caught' if caught else 'NOT caught'} "
                      f"({len(result['differences'])} values differ, e.g. "
                      f"{'; '.join(result['differences'][:2]) or '-'})", flush=True)
                if not caught:
                    failed.append(name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "device": device.type, "graphed": graphed,
                       "deterministic": not args.nondeterministic, "results": results, "failed": failed}, f,
                      indent=1)
    print(f"FAILED: {', '.join(failed)}" if failed else f"all {compared} comparisons agree; every stand-in caught"
          if not args.no_faults else f"all {compared} comparisons agree")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
