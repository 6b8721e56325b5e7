"""Evaluation throughput: images per second of the test loader alone, and of the loader with a model.

    python benchmarks/eval_throughput.py [--device cpu|cuda] [--images-per-class 2] [--batch 200]
                                         [--workers 8] [--passes 2] [--quick] [--json PATH]

A synthetic ImageNet validation set (1000 class folders of 224x224 JPEGs, smooth random colours, made in a
temporary folder) is read by the loader every run evaluates with (:func:`utils.data.build_test_loader`:
ImageNet's resize and crop, persistent workers, pinned memory on CUDA), with ``nThreads = --workers`` (at
most one per CPU) and ``test_batch_size = --batch``. Measured, each over ``--passes`` whole passes after
one untimed pass (worker start, compilation, cuDNN autotuning):

- ``loader``: the batches copied to the device, no model;
- ``float``: ResNet-18 (random weights) through :func:`utils.evaluate.evaluate`, as a run evaluates its teacher;
- ``granq``: its W4A4 GranQ student (kernel-wise weights, ``granq_impl = auto``), as a run evaluates it.

The real validation images are larger (about 400x350 on average) and cost more to decode and resize: on a
machine where decoding is the limit, real figures are lower. ``--quick``: only the first 64 classes hold
an image (the others are empty folders, as the loader allows), batch 16, one timed pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish, synchronize  # noqa: E402
from quantization_utils import granq_path, quantize_model, set_act_tracking  # noqa: E402
from utils.config import load_options  # noqa: E402
from utils.data import build_test_loader  # noqa: E402
from utils.devices import configure_backends  # noqa: E402
from utils.evaluate import evaluate  # noqa: E402
from utils.models import get_model_spec  # noqa: E402

CONFIG = os.path.join(ROOT, "ImageNet", "imagenet_res18.hocon")
CLASSES = 1000


def make_folder(root: str, classes_with_images: int, per_class: int, size: int = 224, seed: int = 0) -> int:
    """1000 class folders under ``root``, the first ``classes_with_images`` holding ``per_class`` JPEGs each.

    Each image is random colour on a 14x14 grid, smoothly enlarged: about the detail of a photograph, where
    pixel noise would be far harder to decode. Returns the number of images.
    """
    rng = np.random.default_rng(seed)
    count = 0
    for c in range(CLASSES):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder)
        for i in range(per_class if c < classes_with_images else 0):
            small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
            small.resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i}.JPEG"), quality=90)
            count += 1
    return count


def loader_only(loader, device: torch.device) -> None:
    for images, labels in loader:
        images.to(device, non_blocking=True)
        labels.to(device, non_blocking=True)
    synchronize(device)


def measure(name: str, run_pass, images: int, passes: int) -> dict:
    run_pass()  # untimed: workers start, compilation, autotuning
    start = time.perf_counter()
    for _ in range(passes):
        run_pass()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "images": images * passes, "images_per_s": images * passes / seconds}
    print(f"  {name:7} {result['images_per_s']:10.1f} images/s ({passes} pass(es) of {images} images, "
          f"{seconds:.2f} s)", flush=True)
    return result


def measure_all(options, device: torch.device, images: int, passes: int) -> dict:
    loader = build_test_loader(options, device)
    print(f"batch {options.test_batch_size}, {loader.num_workers} worker(s), pinned memory: {loader.pin_memory}; "
          f"images/s:", flush=True)
    torch.manual_seed(0)
    float_model = get_model_spec(options.network).build().to(device).eval()
    student = quantize_model(float_model, 4, 4, "granq", "kernel", granq_impl="auto").to(device).eval()
    set_act_tracking(student, False)  # frozen, as evaluation runs it
    results = {
        "loader": measure("loader", lambda: loader_only(loader, device), images, passes),
        "float": measure("float", lambda: evaluate(float_model, loader, device), images, passes),
        "granq": measure("granq", lambda: evaluate(student, loader, device), images, passes),
    }
    return {"workers": loader.num_workers, "pin_memory": loader.pin_memory, "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="test_batch_size (default 200, --quick 16)")
    parser.add_argument("--workers", type=int, default=8, help="nThreads: loader workers, at most one per CPU")
    parser.add_argument("--passes", type=int, default=None, help="timed passes (default 2, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="64 images, batch 16, one timed pass")
    parser.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.batch = args.batch or (16 if args.quick else 200)
    args.passes = args.passes or (1 if args.quick else 2)
    classes_with_images, per_class = (64, 1) if args.quick else (CLASSES, args.images_per_class)
    device = torch.device(args.device)
    backends = configure_backends(False, device)  # as a run with the default deterministic = false
    env = {**environment([device]), "backends": backends}
    print(describe(env), flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        images = make_folder(root, classes_with_images, per_class)
        print(f"{images} JPEGs of 224x224 in {CLASSES} class folders, made in {time.time() - started:.1f} s",
              flush=True)
        options = load_options(CONFIG, [f"dataPath={root}", f"nThreads={args.workers}",
                                        f"test_batch_size={args.batch}", "teacher_weights=random"])
        measured = measure_all(options, device, images, args.passes)  # its loader's workers end with it
    path = granq_path("auto")
    print(f"granq_path: {path}")
    finish(env, started, args.json, {"args": vars(args), "images": images, "granq_path": path, **measured})
    return 0


if __name__ == "__main__":
    sys.exit(main())
