"""Speed of the activation quantizers on the activation shapes of ResNet-20 and ResNet-18.

    python benchmarks/quantizer_speed.py [--quick] [--json PATH] [--device cpu|cuda|all]
                                         [--networks ...] [--batches ...] [--layouts ...]

For every distinct input shape of a QuantAct (ResNet-20 at 32x32, batch 16 and 200; ResNet-18 at 224x224,
batch 16) it times, forward only (no autograd, as in evaluation) and forward + backward (as in training):

- ``layerwise eager`` / ``layerwise fast``: one given range for the tensor (GDFQ), eager and compiled;
- ``channel eager``: one given range per channel, shared by all samples (``act_mode = channel``; training
  runs it eager, so there is no compiled column);
- ``granq eager`` / ``granq fast``: one range per (sample, channel), eager and the fast path training uses;
- ``channel loop``: the same values with a Python loop over channels;
- ``torch per-channel``: ``torch.fake_quantize_per_channel_affine`` on the [N*C, H*W] rows, ranges included.

Each figure is the median of repeated samples, warm-up (and compilation) excluded; methods take turns
within each round so that a busy machine slows all of them alike. The table ends with the ratios of the
speed targets; ``--json`` writes every figure. Every row records ``quant_path``: ``"compiled"``, or
``"eager: <why>"`` where the compiled path failed; then the two "fast" methods are not measured (they
would be eager under another name) and the targets that need them are not evaluated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import describe, environment, finish, synchronize  # noqa: E402
from quantization_utils import QuantAct, StudentSpec, quantize_model  # noqa: E402
from quantization_utils.functional import (  # noqa: E402
    StraightThrough,
    channel_fake_quant,
    channel_loop_fake_quant,
    fake_quantize,
    granq_fake_quant,
    layerwise_fake_quant,
    per_row_params,
    quant_params,
)
from quantization_utils.fused import CompiledGranQ, compile_values  # noqa: E402
from utils.models import get_model_spec  # noqa: E402

# (network, image size, batch sizes)
WORKLOADS = (("resnet20_cifar10", 32, (16, 200)), ("resnet18", 224, (16,)))
METHODS = ("layerwise eager", "layerwise fast", "channel eager", "granq eager", "granq fast", "channel loop",
           "torch per-channel")
MODES = ("fwd", "fwd+bwd")
# The trainer keeps the students' activations channels_last on the CPU (utils/system/devices.py,
# resnet_memory_format).
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def activation_shapes(network: str, image_size: int) -> list[tuple[int, ...]]:
    """Distinct per-sample input shapes of the QuantActs of the quantized ``network``, in order of use."""
    student = quantize_model(get_model_spec(network).build().eval(), StudentSpec.of(8, 8, impl="eager"))
    shapes: list[tuple[int, ...]] = []
    handles = [m.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[1:])))
               for m in student.modules() if isinstance(m, QuantAct)]
    with torch.no_grad():
        student(torch.randn(2, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return list(dict.fromkeys(shapes))


def layerwise_values(x: torch.Tensor, bits: int, x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
    """Values of layerwise_fake_quant: the pure function its fast path compiles."""
    scale, zero_point = quant_params(x_min, x_max, bits)
    return fake_quantize(x, scale, zero_point, clamp_bits=bits)


def torch_per_channel(x: torch.Tensor, bits: int) -> torch.Tensor:
    """GranQ's grid through torch's fused per-channel op, on the (sample, channel) rows.

    torch writes y = (clamp(round(x / step) + z, qmin, qmax) - z) * step with an integer z in [qmin, qmax];
    GranQ writes y = (round(s * x - zp) + zp) / s. The same rows and the same grid are step = 1 / s,
    z = -zp, [qmin, qmax] = [-2**(b-1), 2**(b-1) - 1]. torch requires 0 on the grid (z in [qmin, qmax]),
    which holds for rows whose range contains 0, as every post-ReLU row with a zero does; z is clamped
    for the others, whose values then differ. Where the grid is the same, x / step and * step still round
    differently from s * x and / s: measured on these post-ReLU inputs, about 5% of the values differ, each
    by one unit in the last place (a few 1e-7 of a grid step), never by a grid step. The benchmark reports
    both (``torch_op_mismatch``, ``torch_op_max_diff_steps`` in the JSON).
    """
    rows = x.reshape(x.shape[0] * x.shape[1], -1)
    scale, zero_point = per_row_params(rows, bits, leading_dims=1)
    lowest, highest = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    step = (1 / scale).flatten()
    z = (-zero_point).flatten().clamp(lowest, highest).to(torch.int32)
    return torch.fake_quantize_per_channel_affine(rows, step, z, 0, lowest, highest).view(x.shape)


class Quantizers:
    """The seven methods as ``f(x) -> y`` for one bit-width; the fast paths are compiled once, verified."""

    def __init__(self, bits: int, device: torch.device):
        self.bits = bits
        self.device = device
        self.x_min = torch.zeros((), device=device)
        self.x_max = torch.full((), 3.0, device=device)
        self.channel_ranges = {}  # channels -> the given per-channel range, [0, 3] in every channel
        self.granq_fast = CompiledGranQ(strict=True)
        self.fast_failure = None  # where torch.compile does not work, the "fast" methods are left out
        try:
            self.layerwise_compiled = compile_values(layerwise_values)
            probe = torch.rand(2, 3, 4, 4, device=device)
            self.granq_fast(probe, bits)
            self.layerwise_fast(probe)
        except Exception as error:  # no compiler, no Triton, no eager numerics: report it and measure the rest
            self.fast_failure = f"{type(error).__name__}: {error}".splitlines()[0]
            print(f"WARNING: the compiled path does not work here ({self.fast_failure}); the 'fast' methods are "
                  f"not measured", file=sys.stderr)

    @property
    def quant_path(self) -> str:
        """``"compiled"`` where the "fast" methods run compiled code, else ``"eager: <why>"``."""
        return f"eager: {self.fast_failure}" if self.fast_failure else self.granq_fast.path

    def _layerwise_values(self, x, bits):
        # Compiled as the GranQ fast path is: every size dynamic, one compilation for all shapes.
        x = x.detach()
        for dim in range(x.dim()):
            torch._dynamo.maybe_mark_dynamic(x, dim)
        return self.layerwise_compiled(x, bits, self.x_min, self.x_max)

    def layerwise_fast(self, x):
        return StraightThrough.apply(x, self._layerwise_values, self.bits)

    def channel_eager(self, x):
        channels = x.shape[1]
        if channels not in self.channel_ranges:
            self.channel_ranges[channels] = (self.x_min.expand(channels).clone(), self.x_max.expand(channels).clone())
        return channel_fake_quant(x, self.bits, *self.channel_ranges[channels])

    def methods(self) -> dict:
        b = self.bits
        methods = {
            "layerwise eager": lambda x: layerwise_fake_quant(x, b, self.x_min, self.x_max),
            "layerwise fast": self.layerwise_fast,
            "channel eager": self.channel_eager,
            "granq eager": lambda x: granq_fake_quant(x, b),
            "granq fast": lambda x: self.granq_fast(x, b),
            "channel loop": lambda x: channel_loop_fake_quant(x, b),
            "torch per-channel": lambda x: torch_per_channel(x, b),
        }
        if self.fast_failure:
            del methods["layerwise fast"], methods["granq fast"]
        return methods


def make_call(fn, x: torch.Tensor, mode: str):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(x)
        return call
    leaf = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)

    def call():
        torch.autograd.grad(fn(leaf), leaf, grad)
    return call


def sample(call, number: int, device: torch.device) -> float:
    """Seconds per call, from ``number`` calls timed together."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / number


def time_methods(calls: dict, device: torch.device, repeats: int, min_sample_s: float, budget_s: float) -> dict:
    """Median seconds per call of each method; methods alternate within each round.

    Each sample runs a method enough times to last ``min_sample_s``. A method stops after 3 samples once
    it has used ``budget_s`` (the channel loop on large shapes), the others take all ``repeats``.
    """
    numbers, spent, samples = {}, {}, {name: [] for name in calls}
    for name, call in calls.items():
        for _ in range(2):  # warm-up: compilation, allocator, caches
            call()
        once = max(sample(call, 1, device), 1e-7)
        numbers[name] = max(1, min(1000, int(min_sample_s / once)))
        spent[name] = 0.0
    for _ in range(repeats):
        for name, call in calls.items():
            if len(samples[name]) >= 3 and spent[name] > budget_s:
                continue
            seconds = sample(call, numbers[name], device)
            samples[name].append(seconds)
            spent[name] += seconds * numbers[name]
    return {name: statistics.median(values) for name, values in samples.items()}


def torch_op_mismatch(x: torch.Tensor, bits: int) -> tuple[float, float]:
    """Fraction of elements where torch's per-channel op differs from GranQ, and the largest difference in steps."""
    with torch.no_grad():
        ours, theirs = granq_fake_quant(x, bits), torch_per_channel(x, bits)
        rows = x.reshape(x.shape[0] * x.shape[1], -1)
        step = ((rows.amax(1) - rows.amin(1)) / (2**bits - 1)).clamp(min=1e-30).view(x.shape[0], x.shape[1], 1, 1)
        return (ours != theirs).float().mean().item(), ((ours - theirs).abs() / step).max().item()


def run_device(device: torch.device, args) -> list[dict]:
    quantizers = Quantizers(args.bits, device)
    rows = []
    for network, image_size, batches in WORKLOADS:
        if network not in args.networks:
            continue
        shapes = activation_shapes(network, image_size)
        for batch in (b for b in batches if not args.batches or b in args.batches):
            for shape in shapes:
                full = (batch, *shape)
                generator = torch.Generator().manual_seed(0)
                contiguous = torch.randn(full, generator=generator).relu_().to(device)  # QuantAct inputs follow a ReLU
                for layout in args.layouts:
                    x = contiguous.to(memory_format=LAYOUTS[layout])
                    row = {"device": device.type, "layout": layout, "network": network, "batch": batch,
                           "shape": list(full), "channels": shape[0], "bits": args.bits,
                           "quant_path": None,
                           "torch_op_mismatch": None, "torch_op_max_diff_steps": None}
                    row["torch_op_mismatch"], row["torch_op_max_diff_steps"] = torch_op_mismatch(x, args.bits)
                    for mode in MODES:
                        calls = {name: make_call(fn, x, mode) for name, fn in quantizers.methods().items()}
                        row[mode] = time_methods(calls, device, args.repeats, args.min_sample_s, args.budget_s)
                    row["quant_path"] = quantizers.quant_path
                    rows.append(row)
                    print(f"  {network} {list(full)} {layout}: done", file=sys.stderr, flush=True)
    return rows


def ratios(row: dict) -> dict | None:
    """The ratios of the speed targets; None where the fast methods were not measured."""
    t = row["fwd+bwd"]
    if "granq fast" not in t:
        return None
    return {"granq_fast_over_layerwise_fast": t["granq fast"] / t["layerwise fast"],
            "channel_loop_over_granq_fast": t["channel loop"] / t["granq fast"],
            "granq_eager_over_granq_fast": t["granq eager"] / t["granq fast"]}


def print_table(rows: list[dict]) -> None:
    short = {"layerwise eager": "lw eager", "layerwise fast": "lw fast", "channel eager": "ch eager",
             "granq eager": "granq eager",
             "granq fast": "granq fast", "channel loop": "ch. loop", "torch per-channel": "torch op"}
    for mode in MODES:
        print(f"\n{mode}: milliseconds per call (median)")
        head = (f"{'device':6} {'layout':13} {'network':16} {'shape':>19} "
                + " ".join(f"{short[m]:>11}" for m in METHODS))
        if mode == "fwd+bwd":
            head += f" {'granq/lw':>9} {'loop/granq':>10}"
        print(head)
        for row in rows:
            line = (f"{row['device']:6} {row['layout']:13} {row['network']:16} {'x'.join(map(str, row['shape'])):>19} "
                    + " ".join(f"{1e3 * row[mode][m]:11.3f}" if m in row[mode] else f"{'-':>11}" for m in METHODS))
            if mode == "fwd+bwd":
                r = ratios(row)
                line += (f" {r['granq_fast_over_layerwise_fast']:9.2f} {r['channel_loop_over_granq_fast']:10.1f}"
                         if r else f" {'-':>9} {'-':>10}")
            print(line)
    print("\nquant_path: " + "; ".join(f"{device}: {path}" for device, path in
                                       dict.fromkeys((row["device"], row["quant_path"]) for row in rows)))
    print("\ntargets (fwd+bwd, one run):")
    for device, layout in dict.fromkeys((row["device"], row["layout"]) for row in rows):
        mine = [row for row in rows if (row["device"], row["layout"]) == (device, layout)]
        device = f"{device} {layout}"
        mismatch = max(row["torch_op_mismatch"] for row in mine)
        steps = max(row["torch_op_max_diff_steps"] for row in mine)
        print(f"  {device}: torch per-channel op differs from GranQ on at most {100 * mismatch:.2f}% of the "
              f"elements of a shape, by at most {steps:.1e} of a grid step (rounding, not another grid)")
        eager_rows = [row for row in mine if ratios(row) is None]
        if eager_rows:
            print(f"  {device}: targets of the fast path not evaluated: {eager_rows[0]['quant_path']}")
            continue
        worst = max(ratios(row)["granq_fast_over_layerwise_fast"] for row in mine)
        at64 = [ratios(row)["channel_loop_over_granq_fast"] for row in mine if row["channels"] == 64]
        print(f"  {device}: granq fast / layerwise fast, worst shape: {worst:.2f}x (target <= 1.2: "
              f"{'met' if worst <= 1.2 else 'NOT met'})")
        if at64:
            print(f"  {device}: channel loop / granq fast at 64 channels, lowest: {min(at64):.1f}x (target >= 10: "
                  f"{'met' if min(at64) >= 10 else 'NOT met'})")
        eager = [ratios(row)["granq_eager_over_granq_fast"] for row in mine]
        print(f"  {device}: granq eager / granq fast: {min(eager):.1f}x to {max(eager):.1f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: the CPU, and CUDA when present (default)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="samples per method (default 15, --quick 5)")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter samples")
    parser.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=list(LAYOUTS),
                        help="memory layouts of the activations (default: both)")
    parser.add_argument("--networks", nargs="+", choices=[w[0] for w in WORKLOADS], default=[w[0] for w in WORKLOADS],
                        help="workloads to measure (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, default=[],
                        help="only these of each network's batch sizes (default: all of them)")
    parser.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.min_sample_s = 0.005 if args.quick else 0.02
    args.budget_s = 0.5 if args.quick else 2.0
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        parser.error("--device cuda: CUDA is not available")
    env = environment(devices)
    print(describe(env), flush=True)
    started = time.time()
    rows = []
    for device in devices:
        rows += run_device(device, args)
    print_table(rows)
    finish(env, started, args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
