"""A short run of the command line, then ``--eval`` of its directory: the saved student must give the run's top-1
and top-5 exactly, with ``deterministic = true`` in effect in both.

    python checks/cli_eval.py [--quant-impl auto|compiled|eager] [--quick] [--json PATH]

The run: 2 epochs of CIFAR-10 W6A6 (``--quick``: 2 iterations each at batch 4 on 40 images; else 20 at batch 16
on 400), ``deterministic = true``. The teacher is random and saved to a file, its BatchNorm statistics and last
layer fitted to a synthetic test set (an ImageFolder made in a temporary folder) that is labelled with its own
predictions (:func:`labelled_test_set`), so that a student's accuracy is neither chance nor 100 % and moves with
its weights. With ``--quant-impl compiled`` (no eager fallback) the run must also have run compiled. The device
is the command line's: CUDA where available. Nothing is downloaded.

``--json`` writes the run's and the evaluation's summaries and the result; the last line on stdout is the result
as JSON. The exit status is 1 where a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CIFAR10_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon")
MAIN = os.path.join(ROOT, "CIFAR", "main.py")


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


def _main_py(args: list[str], timeout: float) -> dict:
    """``CIFAR/main.py args...``, its log on stderr; the summary it prints last."""
    done = subprocess.run([sys.executable, MAIN, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"main.py {' '.join(args[:2])} ... exited with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(quant_impl: str, quick: bool) -> dict:
    """Train 2 epochs through the command line, then ``--eval`` the run; the record and what failed."""
    with tempfile.TemporaryDirectory() as root:
        test_set, weights = labelled_test_set(root, 40 if quick else 400)
        # the evaluation cache too goes with the temporary folder: nothing is left in ~/.cache
        sets = [f"save_path={root}/runs", f"dataPath={test_set}", f"teacher_weights={weights}", "nEpochs=2",
                f"iters_per_epoch={2 if quick else 20}", f"batchSize={4 if quick else 16}", "warmup_epochs=0",
                "lr_S=1e-5", "deterministic=true", f"quant_impl={quant_impl}", "test_batch_size=100",
                f"nThreads={0 if quick else 4}", f"eval_cache={root}/eval_cache"]
        # 6 bits: the student agrees with its teacher on part of the images only
        args = ["--conf_path", CIFAR10_CONF, "--id", "1", "--qw", "6", "--qa", "6"]
        for s in sets:
            args += ["--set", s]
        run = _main_py(args, 300)
        evaluated = _main_py(["--eval", run["run_dir"]], 180)
    summary = (f"top-1 {run['student_top1']:.2f} / {evaluated['student_top1']:.2f} (run / --eval), teacher "
               f"{run['teacher_top1']:.2f}, quant_path {run['quant_path']}, deterministic {run['deterministic']} / "
               f"{evaluated['deterministic']}")
    failures = []
    if (evaluated["student_top1"], evaluated["student_top5"]) != (run["student_top1"], run["student_top5"]):
        failures.append(f"--eval differs from the run: {summary}; top-5 {run['student_top5']} / "
                        f"{evaluated['student_top5']}")
    if not (run["deterministic"] and evaluated["deterministic"]):
        failures.append(f"deterministic = true was not in effect: {summary}")
    if quant_impl == "compiled" and run["quant_path"] != "compiled":
        failures.append(f"quant_impl = compiled did not run compiled: {run['quant_path']}")
    return {"run": run, "eval": evaluated, "quant_impl": quant_impl, "result": summary, "failures": failures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quant-impl", default="auto", choices=("auto", "compiled", "eager"))
    parser.add_argument("--quick", action="store_true", help="a smaller run and test set")
    parser.add_argument("--json", metavar="PATH", help="write the record there")
    args = parser.parse_args(argv)
    record = check(args.quant_impl, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print("; ".join(record["failures"]) or record["result"], file=sys.stderr)
    print(json.dumps({key: record[key] for key in ("result", "failures")}), flush=True)
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
