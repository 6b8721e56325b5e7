"""Floating-point operations of one training iteration, counted with ``torch.utils.flop_counter``.

    python benchmarks/flops.py [--json PATH]

Two settings, each with the official config: CIFAR-10 (ResNet-20, batch 16) and CIFAR-100 (ResNet-20,
batch 200). One iteration is what the trainer does per step once the student trains: the generator
makes a batch, teacher and student classify it, the generator's loss is back-propagated into the
generator (through teacher and student) and the student's loss into the student's weights.

``FlopCounterMode`` counts convolutions and matrix products only, a multiply-add as 2 FLOPs; the
quantizers, BatchNorm, activations and losses are elementwise and not counted, so a fake-quantized
student counts the same as a float one. The generator's upsample-then-3x3 stages are counted as they
run (2x2 convolutions of the low-resolution map). Weights are random: the count does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quantization_utils import quantize_model  # noqa: E402
from utils.models import build_teacher  # noqa: E402
from utils.runs.config import load_options  # noqa: E402
from utils.training.generator import build_generator  # noqa: E402

SETTINGS = {
    "cifar10": os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon"),
    "cifar100": os.path.join(ROOT, "CIFAR", "cifar100_resnet20.hocon"),
}


def _counted(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def count_iteration(conf_path: str) -> dict:
    """FLOPs of each forward pass and of the backward passes of one iteration, for ``conf_path``."""
    # Eager quantizers: no compilation under the counter; they hold no counted operation either way.
    options = load_options(conf_path, ["teacher_weights=random", "quant_impl=eager"])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    teacher.eval()
    student = quantize_model(teacher, options.student_spec()).eval()
    generator = build_generator(options).train()
    generator_params = list(generator.parameters())
    student_params = list(student.parameters())
    for p in student_params:
        p.requires_grad_(True)
    z = torch.randn(options.batchSize, options.latent_dim)
    labels = torch.randint(0, options.nClasses, (options.batchSize,))

    generator_fwd, images = _counted(lambda: generator(z, labels))
    teacher_fwd, teacher_logits = _counted(lambda: teacher(images))
    student_fwd, student_logits = _counted(lambda: student(images))
    # The losses hold no counted operation; what matters is which gradients each backward computes,
    # as in the trainer: the generator's loss into the generator only, the student's into the student only.
    generator_loss = teacher_logits.logsumexp(1).mean() + student_logits.logsumexp(1).mean()
    student_loss = (student_logits - teacher_logits.detach()).square().mean()
    generator_bwd, _ = _counted(lambda: generator_loss.backward(inputs=generator_params, retain_graph=True))
    student_bwd, _ = _counted(lambda: student_loss.backward(inputs=student_params))
    forward = generator_fwd + teacher_fwd + student_fwd
    backward = generator_bwd + student_bwd
    return {"network": options.network, "batch": options.batchSize,
            "forward": {"generator": generator_fwd, "teacher": teacher_fwd, "student": student_fwd},
            "backward": {"generator loss (into the generator)": generator_bwd,
                         "student loss (into the student)": student_bwd},
            "forward_total": forward, "backward_total": backward, "total": forward + backward}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON to PATH")
    args = parser.parse_args(argv)
    results = {setting: count_iteration(conf) for setting, conf in SETTINGS.items()}
    giga = 1e9
    print(f"GFLOPs per training iteration (torch {torch.__version__} FlopCounterMode; multiply-add = 2 FLOPs)")
    print(f"{'setting':9} {'batch':>5} {'generator':>10} {'teacher':>9} {'student':>9} {'forward':>9} "
          f"{'backward':>9} {'total':>9} {'per image':>10}")
    for setting, r in results.items():
        f = r["forward"]
        print(f"{setting:9} {r['batch']:5} {f['generator'] / giga:10.3f} {f['teacher'] / giga:9.3f} "
              f"{f['student'] / giga:9.3f} {r['forward_total'] / giga:9.3f} {r['backward_total'] / giga:9.3f} "
              f"{r['total'] / giga:9.3f} {r['total'] / r['batch'] / giga:10.4f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"torch": torch.__version__, "unit": "FLOPs (multiply-add = 2)", "results": results}, out,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
