"""What each recipe's cell of ``tools/plans/methods_cpu.hocon`` costs, to give every method the same wall time.

    python benchmarks/methods_budget.py [--jobs 2] [--iters 10 40] [--budget-iters 100] [--json PATH]

Each recipe runs the plan's cell (its config, its overrides: 8 epochs, evaluations after epochs 6 and 8) at two
small ``iters_per_epoch``, as the plan runs it: ``--jobs`` cells at once with one thread each. A cell's wall time
is then fitted as a + b * iters_per_epoch (a: start-up and evaluations; b: one iteration of each of the 8 epochs),
and the table gives, for each recipe, the ``iters_per_epoch`` whose predicted wall time equals that of the
``granq`` cell at the plan's 100 iterations per epoch: the budget. ``--from-json PATH`` fits the wall times of an
earlier run again (for another ``--budget-iters``) without running anything. Runs on the shared option-A teacher
and JPEG test set (``../shared/data``); a pool recipe reads a small pool (its synthesis untimed), as the cost of an
iteration does not depend on the pool's size. Figures depend on the machine and its load: name the CPU with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
CELL = ["nEpochs=8", "iters_per_epoch={iters}", "eval_every=2", "eval_start_epoch=5", "nThreads=1",
        f"teacher_weights={SHARED}/weights/akamaster_resnet20-12fca82f.th",
        f"dataPath={SHARED}/cifar10-test-jpeg/test"]
RECIPES = ("granq", "adadfq", "gdfq", "synq", "synq_granq")
POOL = ["pool_size=256", "pool_batch=256", "pool_iters=2"]  # a pool to read, not one to learn from
BUDGET_ITERS = 100  # the granq cell's iters_per_epoch in the plan


def command(recipe: str, iters: int, save_path: str) -> list[str]:
    sets = [s.format(iters=iters) for s in CELL] + [f"recipe={recipe}", f"save_path={save_path}",
                                                    f"pool_cache={save_path}/pools"]
    sets += POOL if recipe.startswith("synq") else []
    args = [sys.executable, os.path.join(ROOT, "CIFAR", "main.py"), "--conf_path",
            os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon"), "--id", "1", "--qw", "3", "--qa", "3"]
    return args + [part for s in sets for part in ("--set", s)]


def prepare_pool(save_path: str) -> None:
    """The small pool the synq recipes read, synthesised once before anything is timed."""
    sets = ["recipe=synq", CELL[5], *POOL, f"pool_cache={save_path}/pools"]
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "synthesize.py"), "--conf_path",
                    os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon"), *[p for s in sets for p in ("--set", s)]],
                   check=True, capture_output=True)


def report(walls: dict, iters, budget_iters: int, env: dict, jobs: int, json_path: str | None) -> dict:
    """Fit each recipe's wall time as a + b * iters_per_epoch, print the iterations per epoch of the budget, and write
    the JSON."""
    low, high = iters
    fits = {}
    for recipe in RECIPES:
        slope = (walls[recipe, high] - walls[recipe, low]) / (high - low)
        fits[recipe] = {"fixed_s": walls[recipe, low] - slope * low, "per_iteration_s": slope}
    granq = fits["granq"]
    budget = granq["fixed_s"] + granq["per_iteration_s"] * budget_iters
    print(f"\nbudget: the granq cell at {budget_iters} iterations per epoch, predicted {budget:.0f} s")
    for recipe, fit in fits.items():
        fit["iters_per_epoch"] = max(1, round((budget - fit["fixed_s"]) / fit["per_iteration_s"]))
        print(f"{recipe:11} {fit['fixed_s']:6.1f} s + {fit['per_iteration_s']:.3f} s x iters_per_epoch -> "
              f"iters_per_epoch = {fit['iters_per_epoch']}")
    result = {"environment": env, "jobs": jobs, "iters": list(iters), "budget_iters": budget_iters,
              "budget_s": budget, "walls": {f"{r} {i}": w for (r, i), w in walls.items()}, "fits": fits}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cells at once, one thread each (the plan's --jobs)")
    parser.add_argument("--iters", type=int, nargs=2, default=(10, 40), help="the two iters_per_epoch measured")
    parser.add_argument("--budget-iters", type=int, default=BUDGET_ITERS,
                        help="the granq cell's iters_per_epoch, whose wall time is the budget")
    parser.add_argument("--from-json", metavar="PATH", help="fit the wall times of an earlier run's JSON instead")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            earlier = json.load(f)
        walls = {(key.split()[0], int(key.split()[1])): value for key, value in earlier["walls"].items()}
        report(walls, earlier["iters"], args.budget_iters, earlier["environment"], earlier["jobs"], args.json)
        return 0
    env = environment([])
    print(describe(env), flush=True)
    runs = [(recipe, iters) for iters in args.iters for recipe in RECIPES]
    walls: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as root:
        prepare_pool(root)
        child_env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}
        running: list[tuple[tuple[str, int], subprocess.Popen, float]] = []
        while runs or running:
            while runs and len(running) < args.jobs:
                key = runs.pop(0)
                process = subprocess.Popen(command(*key, os.path.join(root, f"{key[0]}_{key[1]}")),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env)
                running.append((key, process, time.time()))
            time.sleep(0.5)
            for entry in list(running):
                key, process, started = entry
                if process.poll() is not None:
                    if process.returncode != 0:
                        raise SystemExit(f"{key} exited with {process.returncode}")
                    walls[key] = time.time() - started
                    print(f"{key[0]:11} iters_per_epoch {key[1]:4}: {walls[key]:7.1f} s", flush=True)
                    running.remove(entry)
    report(walls, args.iters, args.budget_iters, env, args.jobs, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
