"""Per-channel activation ranges of a float teacher and the error of quantizing them per layer or per channel.

GranQ's motivating observation: within one layer the channels' ranges differ by large factors, so one
range per layer wastes most of the grid on the widest channels and the narrow ones collapse to a few
levels. This module measures that at every position where the student gets a QuantAct (the output of
each activation of ``act_types``, ReLU / ReLU6 by default), from forward hooks registered by module name on
the float teacher.

Quantizers compared, all at the same bit-width and asymmetric grid, named as the ``act_mode`` that
quantizes the student's activations that way:

- ``layerwise``: one (min, max) for the whole batch of the layer (GDFQ; the student's moving average
  of batch ranges equals this on a single batch);
- ``channel``: one (min, max) per channel over the batch (conventional channel-wise; likewise its
  moving average on a single batch);
- ``granq``: one (min, max) per (sample, channel) (GranQ).

The error is the relative squared error ``||Q(x) - x||^2 / ||x||^2`` over the batch.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from quantization_utils import channel_fake_quant, granq_fake_quant, layerwise_fake_quant
from quantization_utils.functional import channel_range
from quantization_utils.quantize import ACTIVATIONS

__all__ = ["QUANTIZERS", "LayerStats", "activation_stats", "measure_activation_ranges", "stats_table",
           "write_csv", "write_figure"]

QUANTIZERS = ("layerwise", "channel", "granq")


@dataclass
class LayerStats:
    """Ranges and quantization errors of one activation (one call of one activation module)."""

    name: str
    shape: tuple  # of the activation, batch first
    channel_ranges: torch.Tensor  # [C]: max - min of each channel over the batch
    dead_channels: int  # channels that are zero on every input of the batch
    channel_spread: float  # largest / median channel range, over the live channels
    sample_channel_spread: float  # largest / median range over the live (sample, channel) pairs
    relative_error: dict[str, float] = field(default_factory=dict)  # quantizer -> ||Q(x)-x||^2 / ||x||^2

    @property
    def channels(self) -> int:
        return self.shape[1]


def _spread(ranges: torch.Tensor) -> float:
    live = ranges[ranges > 0]
    if live.numel() == 0:
        return float("nan")
    return (live.max() / live.median()).item()


def _relative_error(quantized: torch.Tensor, x: torch.Tensor) -> float:
    energy = x.double().pow(2).sum()
    error = (quantized.double() - x.double()).pow(2).sum()
    if energy == 0:  # an all-zero activation is represented exactly by every quantizer
        return 0.0
    return (error / energy).item()


@torch.no_grad()
def activation_stats(x: torch.Tensor, bits: int, name: str = "") -> LayerStats:
    """Ranges and the three quantizers' relative errors of one activation ``x`` ([N, C, ...])."""
    if x.dim() < 2:
        raise ValueError(f"activation {name!r} has shape {tuple(x.shape)}; expected [N, C, ...]")
    x = x.detach().float()
    rows = x.reshape(x.shape[0], x.shape[1], -1)
    lo, hi = torch.aminmax(rows, dim=2)  # per (sample, channel)
    channel_ranges = hi.amax(dim=0) - lo.amin(dim=0)
    quantized = {  # each with the ranges of this batch, as the student's QuantAct after one tracked batch
        "layerwise": layerwise_fake_quant(x, bits, x.min(), x.max()),
        "channel": channel_fake_quant(x, bits, *channel_range(x)),
        "granq": granq_fake_quant(x, bits),  # exactly what the student's QuantAct computes
    }
    return LayerStats(
        name=name,
        shape=tuple(x.shape),
        channel_ranges=channel_ranges.cpu(),
        dead_channels=int(((hi == 0) & (lo == 0)).all(dim=0).sum()),
        channel_spread=_spread(channel_ranges),
        sample_channel_spread=_spread((hi - lo).flatten()),
        relative_error={key: _relative_error(q, x) for key, q in quantized.items()},
    )


@torch.no_grad()
def measure_activation_ranges(model: nn.Module, images: torch.Tensor, bits: int,
                              activations: tuple[type, ...] = ACTIVATIONS) -> list[LayerStats]:
    """:func:`activation_stats` of the output of every module of ``activations`` (the classes of the
    ``act_types``; ReLU and ReLU6 by default) in ``model`` on ``images``, in call order.

    Statistics are computed inside the hooks, so no activation is kept and large models fit. A module
    called more than once gets ``#2``, ``#3``... after its name.
    """
    results: list[LayerStats] = []
    calls: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            results.append(activation_stats(output, bits, label))

        return hook

    handles = [module.register_forward_hook(hook_for(name))
               for name, module in model.named_modules() if isinstance(module, activations)]
    if not handles:
        names = ", ".join(cls.__name__ for cls in activations)
        raise ValueError(f"the model has no {names} module: no QuantAct positions to measure (set act_types)")
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return results


TABLE_COLUMNS = ("index", "layer", "channels", "dead_channels", "channel_range_median", "channel_range_max",
                 "channel_spread", "sample_channel_spread", "rel_error_layerwise", "rel_error_channel",
                 "rel_error_granq", "layerwise_over_granq")


def _row(index: int, s: LayerStats) -> dict:
    live = s.channel_ranges[s.channel_ranges > 0]
    error = s.relative_error
    return {
        "index": index,
        "layer": s.name,
        "channels": s.channels,
        "dead_channels": s.dead_channels,
        "channel_range_median": live.median().item() if live.numel() else 0.0,
        "channel_range_max": s.channel_ranges.max().item(),
        "channel_spread": s.channel_spread,
        "sample_channel_spread": s.sample_channel_spread,
        "rel_error_layerwise": error["layerwise"],
        "rel_error_channel": error["channel"],
        "rel_error_granq": error["granq"],
        "layerwise_over_granq": error["layerwise"] / error["granq"] if error["granq"] > 0 else float("inf"),
    }


def write_csv(stats: list[LayerStats], path: str) -> None:
    """One row per layer with the columns of :data:`TABLE_COLUMNS`."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for index, s in enumerate(stats):
            writer.writerow(_row(index, s))


def stats_table(stats: list[LayerStats], bits: int) -> str:
    """Markdown table of the per-layer ranges and errors, with the median over layers below."""
    lines = [
        f"| # | layer (ReLU output) | channels (dead) | channel range median / max | max / median: channels | "
        f"max / median: (sample, channel) | rel. error A{bits} layer-wise | per-channel | GranQ | "
        f"layer-wise / GranQ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [_row(i, s) for i, s in enumerate(stats)]
    for r in rows:
        lines.append(
            f"| {r['index']} | `{r['layer']}` | {r['channels']} ({r['dead_channels']}) | "
            f"{r['channel_range_median']:.3g} / {r['channel_range_max']:.3g} | {r['channel_spread']:.1f} | "
            f"{r['sample_channel_spread']:.1f} | {r['rel_error_layerwise']:.2e} | {r['rel_error_channel']:.2e} | "
            f"{r['rel_error_granq']:.2e} | {r['layerwise_over_granq']:.1f} |")
    medians = {key: torch.tensor([r[key] for r in rows], dtype=torch.float64).nanmedian().item()
               for key in ("channel_spread", "sample_channel_spread", "rel_error_layerwise", "rel_error_channel",
                           "rel_error_granq", "layerwise_over_granq")}
    lines.append(f"| | median over {len(rows)} layers | | | {medians['channel_spread']:.1f} | "
                 f"{medians['sample_channel_spread']:.1f} | {medians['rel_error_layerwise']:.2e} | "
                 f"{medians['rel_error_channel']:.2e} | {medians['rel_error_granq']:.2e} | "
                 f"{medians['layerwise_over_granq']:.1f} |")
    return "\n".join(lines) + "\n"


def write_figure(stats: list[LayerStats], bits: int, path: str, title: str) -> None:
    """Two panels over the layers: the distribution of channel ranges (log scale), and each quantizer's
    relative error at ``bits`` (log scale)."""
    figure = Figure(figsize=(max(8.0, 0.45 * len(stats) + 3), 8), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    positions = list(range(len(stats)))
    ranges_axes, error_axes = figure.subplots(2, 1, sharex=True)
    live = [s.channel_ranges[s.channel_ranges > 0].numpy() for s in stats]
    # A layer whose channels are all dead has nothing to draw; a tiny placeholder keeps positions aligned.
    ranges_axes.boxplot([v if len(v) else [float("nan")] for v in live], positions=positions, widths=0.6,
                        whis=(0, 100), showfliers=False)
    ranges_axes.set_yscale("log")
    ranges_axes.set_ylabel("per-channel range (max - min)")
    ranges_axes.set_title("channel ranges within each layer (box: quartiles, whiskers: min and max)")
    ranges_axes.grid(alpha=0.3, axis="y")
    labels = {"layerwise": "layer-wise (one range per layer)", "channel": "per channel (over the batch)",
              "granq": "GranQ (per sample and channel)"}
    for key, marker in zip(QUANTIZERS, ("o", "s", "^")):
        error_axes.plot(positions, [s.relative_error[key] for s in stats], marker=marker, label=labels[key])
    error_axes.set_yscale("log")
    error_axes.set_ylabel(f"relative squared error at A{bits}")
    error_axes.set_title("quantization error of each layer's activation")
    error_axes.grid(alpha=0.3)
    error_axes.legend(fontsize="small")
    error_axes.set_xticks(positions)
    error_axes.set_xticklabels([s.name for s in stats], rotation=90, fontsize="x-small")
    figure.savefig(path, dpi=100)
