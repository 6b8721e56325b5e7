"""Sizes of the exported files and onnxruntime CPU latency of float teacher, GranQ and layer-wise students.

    python benchmarks/export_sizes.py [--json benchmarks/results/export_sizes_cpu.json] [--repeats 30]

Sizes, for ResNet-20 at W3/W4/W5 (the option-A teacher of ../shared/data where it is there, else random
weights, which give other zero-point widths) and ResNet-18 at W4 (pytorchcv's architecture with random weights:
the published ones cannot be downloaded here), GranQ students with the default per-kernel weight ranges and,
for W3, with per-channel ones: bytes of the teacher's float state dict, the student's state dict, the packed
file (student.safetensors) and the ONNX file (student.onnx), as tools/export.py writes them.

Latency: onnxruntime's CPU provider, median of ``--repeats`` runs after 3 warm-up runs, batch 1 and 64, of
the float teacher (torch.onnx.export of the teacher itself), the W4A4 GranQ student and the W4A4 layer-wise
student of ResNet-20 (tracked ranges calibrated on random images: the time does not depend on them), with
as many intra-op threads as torch uses (``OMP_NUM_THREADS`` or the cores).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish  # noqa: E402
from quantization_utils import quantize_model, set_act_tracking  # noqa: E402
from utils.export import export_onnx, save_packed  # noqa: E402
from utils.export.runtime import onnx_session  # noqa: E402
from utils.models import build_teacher  # noqa: E402
from utils.runs.config import load_options  # noqa: E402

SHARED_WEIGHTS = os.path.join(os.path.dirname(ROOT), "shared", "data", "weights", "akamaster_resnet20-12fca82f.th")
CIFAR = os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon")
IMAGENET = os.path.join(ROOT, "ImageNet", "imagenet_res18.hocon")
SIZES = [("resnet20a_cifar10", CIFAR, 3, "kernel"), ("resnet20a_cifar10", CIFAR, 4, "kernel"),
         ("resnet20a_cifar10", CIFAR, 5, "kernel"), ("resnet20a_cifar10", CIFAR, 3, "channel"),
         ("resnet18", IMAGENET, 4, "kernel")]


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _student(options, teacher, calibrate_size: int | None = None):
    student = quantize_model(teacher, dataclasses.replace(options, quant_impl="eager").student_spec()).eval()
    if calibrate_size:
        set_act_tracking(student, True)
        with torch.no_grad():
            student(torch.randn(16, 3, calibrate_size, calibrate_size, generator=torch.Generator().manual_seed(0)))
        set_act_tracking(student, False)
    return student


def _teacher(network: str):
    weights = SHARED_WEIGHTS if network == "resnet20a_cifar10" and os.path.isfile(SHARED_WEIGHTS) else "random"
    torch.manual_seed(0)
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        teacher, source = build_teacher(network, weights)
    return teacher, "random" if source == "random" else os.path.basename(source)


def sizes(folder: str) -> list[dict]:
    rows = []
    for network, conf, bits, granularity in SIZES:
        options = load_options(conf, [f"network={network}", f"weight_granularity={granularity}"], qw=bits, qa=bits)
        teacher, weights = _teacher(network)
        student = _student(options, teacher)
        packed = save_packed(student, os.path.join(folder, "s.safetensors"), options.to_dict())
        onnx_bytes = export_onnx(student, options, os.path.join(folder, "s.onnx"))
        row = {"network": network, "weights": weights, "bits": f"W{bits}A{bits}", "weight_granularity": granularity,
               "teacher_state_dict": _state_bytes(teacher), "student_state_dict": _state_bytes(student),
               "packed": packed, "onnx": onnx_bytes}
        rows.append(row)
        print(f"{network} {row['bits']} {granularity}: teacher {row['teacher_state_dict']:,}, student "
              f"{row['student_state_dict']:,}, packed {packed:,} ({100 * packed / row['student_state_dict']:.1f} %), "
              f"ONNX {onnx_bytes:,} ({100 * onnx_bytes / row['student_state_dict']:.1f} %)", flush=True)
    return rows


def _median_ms(session, batch: int, repeats: int) -> float:
    images = torch.randn(batch, 3, 32, 32).numpy()
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: images})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def latency(folder: str, repeats: int) -> list[dict]:
    teacher, weights = _teacher("resnet20a_cifar10")
    models = {}
    path = os.path.join(folder, "teacher.onnx")
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(teacher, (torch.randn(2, 3, 32, 32),), path, dynamo=True, opset_version=21,
                          input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    models["float teacher"] = path
    for act_mode in ("granq", "layerwise"):
        options = load_options(CIFAR, [f"act_mode={act_mode}"], qw=4, qa=4)
        path = os.path.join(folder, f"{act_mode}.onnx")
        export_onnx(_student(options, teacher, calibrate_size=32), options, path)
        models[f"W4A4 {act_mode} student"] = path
    rows = []
    for name, path in models.items():
        session = onnx_session(path)
        row = {"model": name, "network": "resnet20a_cifar10", "weights": weights,
               "threads": torch.get_num_threads(),
               **{f"batch_{batch}_ms": round(_median_ms(session, batch, repeats), 3) for batch in (1, 64)}}
        rows.append(row)
        print(f"{name}: batch 1 {row['batch_1_ms']:.2f} ms, batch 64 {row['batch_64_ms']:.2f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    import onnxruntime

    env = {**environment(["cpu"]), "onnxruntime": onnxruntime.__version__}
    print(describe(env), flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        payload = {"sizes": sizes(folder), "latency": latency(folder, args.repeats)}
    finish(env, started, args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
