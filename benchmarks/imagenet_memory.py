"""Peak memory (max RSS) of ImageNet training steps on the CPU, one fresh process per network.

    python benchmarks/imagenet_memory.py [--configs imagenet_res18 imagenet_res50 imagenet_MV2]
                                         [--batch 16] [--iters 3] [--eval-batch 200]

Each network runs ``--iters`` generator + student iterations of the shared trainer at ``--batch``
224 x 224 images, with a random teacher (``teacher_weights=random``: the weights do not change the
memory) and no warm-up, so every iteration also trains the student: that is the largest step.
The figure is the process's ``ru_maxrss``: Python, PyTorch, teacher, student, generator, their
optimizer states and the autograd graph of one iteration.

With ``--eval-batch N`` a second fresh process per network evaluates the teacher and the student on
one batch of N random 224 x 224 images (the evaluation pass of a run, at ``test_batch_size = N``).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import cpu_name  # noqa: E402

CONFIGS = ("imagenet_res18", "imagenet_res50", "imagenet_MV2")
GIB = 1024**3


def _max_rss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(config: str, batch: int, iters: int) -> dict:
    """Run the training iterations in this process and return its figures."""
    import torch

    from utils.models import build_teacher
    from utils.runs.config import load_options
    from utils.training.trainer import Trainer

    options = load_options(os.path.join(ROOT, "ImageNet", f"{config}.hocon"),
                           ["teacher_weights=random", f"batchSize={batch}", f"iters_per_epoch={iters}",
                            "warmup_epochs=0", f"log_interval={iters}"])
    teacher, _ = build_teacher(options.network, options.teacher_weights)
    with tempfile.TemporaryDirectory() as run_dir:
        # No test loader: only training iterations are measured.
        trainer = Trainer(options, teacher, None, torch.device("cpu"), run_dir, {})
        rss_before = _max_rss_bytes()
        started = time.perf_counter()
        record = trainer.train_epoch(0)
        seconds = time.perf_counter() - started
    return {"config": config, "network": options.network, "batch": batch, "iters": iters,
            "max_rss_gib": round(_max_rss_bytes() / GIB, 2), "setup_rss_gib": round(rss_before / GIB, 2),
            "seconds_per_iter": round(seconds / iters, 2), "loss_S": record["loss_S"],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def measure_evaluation(config: str, batch: int) -> dict:
    """Evaluate teacher and student on one random batch in this process and return its figures."""
    import torch

    from quantization_utils import quantize_model
    from utils.models import build_teacher
    from utils.runs.config import load_options
    from utils.training.evaluate import evaluate

    options = load_options(os.path.join(ROOT, "ImageNet", f"{config}.hocon"), ["teacher_weights=random"])
    teacher, _ = build_teacher(options.network, options.teacher_weights)
    student = quantize_model(teacher, options.student_spec())
    batches = [(torch.randn(batch, 3, 224, 224), torch.zeros(batch, dtype=torch.long))]
    started = time.perf_counter()
    for model in (teacher, student):
        evaluate(model, batches, torch.device("cpu"))
    return {"config": config, "network": options.network, "eval_batch": batch,
            "max_rss_gib": round(_max_rss_bytes() / GIB, 2), "seconds": round(time.perf_counter() - started, 1)}


def _run_worker(*args: str) -> dict | None:
    # A fresh process per measurement: ru_maxrss is a high-water mark that never goes down.
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--eval-batch", type=int, default=0, help="also measure evaluation at this batch size")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--worker-eval", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.iters)), flush=True)
        return 0
    if args.worker_eval:
        print(json.dumps(measure_evaluation(args.worker_eval, args.eval_batch)), flush=True)
        return 0

    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; batch {args.batch}, 224 x 224, "
          f"{args.iters} iterations")
    evaluation = f" | peak RSS, evaluation at batch {args.eval_batch} (GiB)" if args.eval_batch else ""
    print(f"| config | network | peak RSS, training (GiB) | RSS before training (GiB) | s / iteration{evaluation} |")
    print("|---|---|---|---|---|" + ("---|" if args.eval_batch else ""))
    failed = 0
    for config in args.configs:
        figures = _run_worker("--worker", config, "--batch", str(args.batch), "--iters", str(args.iters))
        if figures is None:
            failed += 1
            print(f"| {config} | training failed | | | |")
            continue
        row = (f"| {config} | {figures['network']} | {figures['max_rss_gib']:.2f} | {figures['setup_rss_gib']:.2f} "
               f"| {figures['seconds_per_iter']:.1f} |")
        if args.eval_batch:
            evaluated = _run_worker("--worker-eval", config, "--eval-batch", str(args.eval_batch))
            failed += evaluated is None
            row += " failed |" if evaluated is None else f" {evaluated['max_rss_gib']:.2f} |"
        print(row, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
