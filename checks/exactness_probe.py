"""Compiled GranQ values against eager, value by value, with and without Inductor's eager-numerics options.

    python checks/exactness_probe.py --device cpu|cuda [--quick] [--json PATH]

For bits 2 to 8 it counts the values where the compiled :func:`~quantization_utils.functional.grouped_values`
(compiled as :mod:`quantization_utils.fused` compiles it) differs from eager, on

- activations: post-ReLU random tensors of every QuantAct input shape of ResNet-20 (CIFAR, 32x32, batch 16)
  and ResNet-18 (ImageNet, 224x224, batch 16; ``--quick``: batch 2), one range per (sample, channel);
- weights: every conv and linear weight of the two networks as built (their own initialisation), one range
  per (out, in) kernel and one per output channel (``--quick``: those of at most a million values);
- exact halves: the tensors of the first-call check, whose values are all ties of ``round``
  (:func:`~quantization_utils.fused.tie_tensor`);

in the contiguous and the channels_last layout (``--quick``: contiguous). Each setting of the options
(``eager numerics``: the options :mod:`~quantization_utils.fused` uses; ``inductor default``: none) is
compiled afresh. A torch that lacks the options (2.11, say) runs the default setting only. Nothing is
downloaded.

The exit status is 1 where a value differs in the setting the package uses on this device (the options where
this torch has them; on the CPU the default otherwise), else 0. A difference is also given in grid steps:
below 1e-3 is a last-bit difference of the division, 1 is a value rounded to the neighbouring grid point.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import describe, environment, finish  # noqa: E402
from benchmarks.quantizer_speed import activation_shapes  # noqa: E402
from quantization_utils.functional import (  # noqa: E402
    granq_fake_quant,
    grouped_values,
    per_row_params,
    weight_fake_quant,
)
from quantization_utils.fused import (  # noqa: E402
    compile_values,
    grouped_call,
    missing_eager_numerics,
    tie_tensor,
)
from utils.models import get_model_spec  # noqa: E402

# (network, image size, batch, batch with --quick)
NETWORKS = (("resnet20_cifar10", 32, 16, 16), ("resnet18", 224, 16, 2))
QUICK_MAX_WEIGHT = 1_000_000  # --quick leaves out larger weights (ResNet-18's 512-channel convolutions)
BITS = range(2, 9)
# The tensors of the first-call check for each role and rank (quantization_utils.fused.TIE_SHAPES).
TIE_CASES = (("activation", (2, 4, 23, 23)), ("activation", (8, 529)), ("kernel weight", (2, 4, 23, 23)),
             ("channel weight", (8, 2, 23, 23)), ("channel weight", (8, 529)))


def leading_dims(role: str, dims: int) -> int:
    """How many leading dimensions index the ranges: (sample, channel) or (out, in) of a 4-D tensor, else rows."""
    return 2 if dims == 4 and role != "channel weight" else 1


def eager_values(role: str, x: torch.Tensor, bits: int) -> torch.Tensor:
    if role == "activation":
        return granq_fake_quant(x, bits)
    return weight_fake_quant(x, bits, role.split()[0])


def cases(device: torch.device, quick: bool):
    """(network, role, tensor) for every tensor the probe checks, contiguous; the shape for the tie tensors."""
    generator = torch.Generator().manual_seed(0)
    for network, image_size, batch, quick_batch in NETWORKS:
        for shape in activation_shapes(network, image_size):
            x = torch.randn((quick_batch if quick else batch, *shape), generator=generator).relu_()
            yield network, "activation", x.to(device)
        model = get_model_spec(network).build()
        weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for w in {tuple(w.shape): w for w in weights}.values():  # one weight per shape
            if quick and w.numel() > QUICK_MAX_WEIGHT:
                continue
            for role in ("kernel weight", "channel weight"):
                yield network, role, w.to(device)
    for role, shape in TIE_CASES:
        yield "ties", role, shape  # built per bit-width


def compare(compiled, role: str, x: torch.Tensor, bits: int) -> dict:
    leading = leading_dims(role, x.dim())
    with torch.no_grad():
        ours = grouped_call(compiled, x, bits, leading)
        theirs = eager_values(role, x, bits)
        differ = ours != theirs
        steps = 0.0
        if differ.any():
            scale, _ = per_row_params(x, bits, leading)
            steps = ((ours - theirs).abs() * scale).max().item()
    return {"differ": int(differ.sum().item()), "total": x.numel(), "max_steps": steps}


def probe(device: torch.device, eager_numerics: bool, layouts, quick: bool) -> list[dict]:
    torch._dynamo.reset()  # a fresh compilation for this setting of the options
    compiled = compile_values(grouped_values, eager_numerics=eager_numerics)
    setting = "eager numerics" if eager_numerics else "inductor default"
    results = []
    for network, role, tensor in cases(device, quick):
        for layout in layouts:
            for bits in BITS:
                if network == "ties":
                    x = tie_tensor(tensor, leading_dims(role, len(tensor)), bits, role != "activation", device=device,
                                   channels_last=layout == "channels_last" and len(tensor) == 4)
                else:
                    x = tensor
                    if layout == "channels_last" and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                if layout == "channels_last" and x.dim() != 4:
                    continue
                if x.numel() == x.shape[:leading_dims(role, x.dim())].numel():
                    continue  # rows of one element: the package quantizes them eagerly
                record = {"options": setting, "network": network, "role": role, "shape": list(x.shape),
                          "layout": layout, "bits": bits}
                record.update(compare(compiled, role, x, bits))
                results.append(record)
    return results


def print_summary(results: list[dict]) -> None:
    """One line per (options, network, role, shape, layout), the bit-widths summed; then the totals."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["options"], r["network"], r["role"], tuple(r["shape"]), r["layout"]), []).append(r)
    print(f"\n{'options':16} {'network':16} {'role':14} {'shape':>18} {'layout':13} {'differ':>9} {'of':>11} "
          f"{'max steps':>9}  bits that differ")
    for (options, network, role, shape, layout), records in groups.items():
        differ = sum(r["differ"] for r in records)
        total = sum(r["total"] for r in records)
        steps = max(r["max_steps"] for r in records)
        bits = [r["bits"] for r in records if r["differ"]]
        print(f"{options:16} {network:16} {role:14} {'x'.join(map(str, shape)):>18} {layout:13} {differ:9d} "
              f"{total:11d} {steps:9.3g}  {bits or '-'}")
    for options in dict.fromkeys(r["options"] for r in results):
        mine = [r for r in results if r["options"] == options]
        differ = sum(r["differ"] for r in mine)
        cases_differ = sum(1 for r in mine if r["differ"])
        print(f"\n{options}: {differ} of {sum(r['total'] for r in mine)} values differ from eager "
              f"({cases_differ} of {len(mine)} cases of shape, layout and bits)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="ResNet-18 at batch 2 without its largest weights; the contiguous layout only")
    parser.add_argument("--json", metavar="PATH", help="write every case to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        # past the limit, torch.compile would run eager silently, and the probe would compare eager to eager
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    missing = missing_eager_numerics()
    env = environment([device])
    print(describe(env), flush=True)
    print("eager-numerics options: " + (f"missing ({', '.join(missing)}): only the inductor default is probed"
                                        if missing else "available"), flush=True)
    layouts = ("contiguous",) if args.quick else ("contiguous", "channels_last")
    started = time.time()
    results = []
    for eager_numerics in ((False,) if missing else (True, False)):
        results += probe(device, eager_numerics, layouts, args.quick)
    print_summary(results)
    used = "eager numerics" if not missing else "inductor default" if device.type == "cpu" else None
    failed = used is not None and any(r["differ"] for r in results if r["options"] == used)
    print(f"\nthe setting the package uses on {device.type}: "
          + (f"{used}, {'values DIFFER from eager' if failed else 'equal to eager'}" if used
             else "none (this torch lacks the options: the package quantizes eagerly there)"))
    finish(env, started, args.json, {"args": vars(args), "missing_eager_numerics": missing, "package_setting": used,
                                     "cases": results})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
