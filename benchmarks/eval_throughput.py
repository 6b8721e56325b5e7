"""Evaluation throughput: images per second of the decoding loader, of the cached loader, and of models.

    python benchmarks/eval_throughput.py [--device cpu|cuda] [--images-per-class 2] [--batch 200]
                                         [--workers 8] [--passes 2] [--quick] [--json PATH]

A synthetic ImageNet validation set is made in a temporary folder: 1000 class folders of JPEGs of the sizes
the real validation images have (500x375, 375x500, 500x333 and 400x300 in turn; random colours on a coarse
grid, smoothly enlarged: about the detail of a photograph; quality 90). Both loaders are the runs' own
(:func:`utils.data.loaders.build_test_loader`, ImageNet's resize to 256 and centre crop of 224, ``nThreads =
--workers``, at most one per CPU, ``test_batch_size = --batch``). Measured, each over ``--passes`` whole
passes (the loaders: repeated until at least a second has passed) after one untimed pass; the rate is
that of the median pass:

- ``decode``: ``eval_cache = off``: every image decoded, resized and cropped at every pass (persistent
  workers, pinned memory on CUDA), the batches copied to the device;
- ``cached``: ``eval_cache`` in the temporary folder: batches from the decoded uint8 array, normalised on
  the device. ``build_s`` is the one-time cost (decoding every image once and writing the file), ``load_s``
  what a later run pays (reading and checking the file);
- ``float``: ResNet-18 (random weights) through :func:`utils.training.evaluate.evaluate` from the cached loader, as a
  run evaluates its teacher;
- ``granq``: its W4A4 GranQ student (kernel-wise weights, ``quant_impl = auto``), as a run evaluates it.

``exact``: every batch of the cached loader is ``torch.equal`` to the decoding loader's. The last line
printed is one JSON row: ``decode_images_s``, ``cached_images_s``, their ``ratio``, ``exact``, ``build_s``,
``load_s``, ``float_images_s``, ``granq_images_s``. ``--quick``: only the first 64 classes hold an image
(the others are empty folders, as the loader allows), batch 16, one timed pass.

With glibc, the process first fixes malloc's mmap and trim thresholds (``mallopt``; ``--default-malloc``
leaves them alone). glibc otherwise adapts them to what the process has freed before, and in some processes
each new batch then gets freshly mapped pages: on the 2-core machine the same cached-loader loop ran at about
5,000 or 24,000 images/s, depending on one earlier allocation (1,500 page faults per batch of 16 against
none). Fixed thresholds measure the loaders' own work in every run.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import describe, environment, finish, synchronize  # noqa: E402
from quantization_utils import StudentSpec, quant_path, quantize_model, set_act_tracking  # noqa: E402
from utils.data.loaders import build_test_loader  # noqa: E402
from utils.models import get_model_spec  # noqa: E402
from utils.runs.config import load_options  # noqa: E402
from utils.system.devices import configure_backends  # noqa: E402
from utils.training.evaluate import evaluate  # noqa: E402

CONFIG = os.path.join(ROOT, "ImageNet", "imagenet_res18.hocon")
CLASSES = 1000
SIZES = ((500, 375), (375, 500), (500, 333), (400, 300))  # width x height, as ImageNet's validation images
LOADER_SECONDS = 1.0  # a loader's timed passes last at least this long


def steady_malloc() -> bool:
    """Fix glibc's mmap threshold (256 MiB) and trim threshold (512 MiB): blocks below them come from the heap
    and are reused, instead of being mapped (and their pages zeroed) anew. False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(libc.mallopt(m_trim_threshold, 512 << 20))


def make_folder(root: str, classes_with_images: int, per_class: int, seed: int = 0) -> int:
    """1000 class folders under ``root``, the first ``classes_with_images`` holding ``per_class`` JPEGs each.

    Each image is random colour on a grid of 16 x 16 pixel cells, smoothly enlarged: about the detail of a
    photograph, where pixel noise would be far harder to decode. Returns the number of images.
    """
    rng = np.random.default_rng(seed)
    count = 0
    for c in range(CLASSES):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder)
        for i in range(per_class if c < classes_with_images else 0):
            width, height = SIZES[count % len(SIZES)]
            small = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
            small.resize((width, height), Image.BILINEAR).save(os.path.join(folder, f"{i}.JPEG"), quality=90)
            count += 1
    return count


def loader_only(loader, device: torch.device) -> None:
    for images, labels in loader:
        images.to(device, non_blocking=True)
        labels.to(device, non_blocking=True)
    synchronize(device)


def measure(name: str, run_pass, images: int, passes: int, min_seconds: float = 0.0) -> dict:
    """Images/s of the median pass: on a shared machine a pass that other processes slowed down moves it less
    than it moves the mean (``mean_images_per_s``)."""
    run_pass()  # untimed: workers start, compilation, autotuning
    times = []
    while len(times) < passes or sum(times) < min_seconds:
        start = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - start)
    result = {"seconds": sum(times), "images": images * len(times), "passes": len(times),
              "images_per_s": images / statistics.median(times), "mean_images_per_s": images * len(times) / sum(times)}
    print(f"  {name:7} {result['images_per_s']:10.1f} images/s (median of {len(times)} pass(es) of {images} "
          f"images; mean {result['mean_images_per_s']:.1f})", flush=True)
    return result


def same_batches(cached, decoding, device: torch.device) -> bool:
    """Whether every batch of the cached loader equals the decoding loader's, bit for bit."""
    pairs = 0
    for (images, labels), (decoded, decoded_labels) in zip(cached, decoding, strict=True):
        if not (torch.equal(images, decoded.to(device)) and torch.equal(labels, decoded_labels.to(device))):
            return False
        pairs += 1
    return pairs == len(decoding)


def measure_all(options, device: torch.device, images: int, passes: int) -> dict:
    decoding = build_test_loader(dataclasses.replace(options, eval_cache="off"), device)
    started = time.perf_counter()
    build_test_loader(options, device)  # decodes every image once and writes the cache file
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    cached = build_test_loader(options, device)  # as a later run: reads and checks the file
    load_s = time.perf_counter() - started
    print(f"cache: built in {build_s:.2f} s, loaded in {load_s:.2f} s, images on {cached.images.device}; "
          f"decoding: batch {options.test_batch_size}, {decoding.num_workers} worker(s), pinned memory: "
          f"{decoding.pin_memory}; images/s:", flush=True)
    exact = same_batches(cached, decoding, device)
    torch.manual_seed(0)
    float_model = get_model_spec(options.network).build().to(device).eval()
    student = quantize_model(float_model, StudentSpec.of(4, 4, mode="granq", granularity="kernel", impl="auto"))
    student = student.to(device).eval()
    set_act_tracking(student, False)  # frozen, as evaluation runs it
    results = {
        "decode": measure("decode", lambda: loader_only(decoding, device), images, passes, LOADER_SECONDS),
        "cached": measure("cached", lambda: loader_only(cached, device), images, passes, LOADER_SECONDS),
        "float": measure("float", lambda: evaluate(float_model, cached, device), images, passes),
        "granq": measure("granq", lambda: evaluate(student, cached, device), images, passes),
    }
    row = {"device": str(device), "images": images, "batch": options.test_batch_size,
           "workers": decoding.num_workers, "decode_images_s": round(results["decode"]["images_per_s"], 1),
           "cached_images_s": round(results["cached"]["images_per_s"], 1),
           "ratio": round(results["cached"]["images_per_s"] / results["decode"]["images_per_s"], 1),
           "exact": exact, "build_s": round(build_s, 3), "load_s": round(load_s, 3),
           "float_images_s": round(results["float"]["images_per_s"], 2),
           "granq_images_s": round(results["granq"]["images_per_s"], 2)}
    return {"workers": decoding.num_workers, "pin_memory": decoding.pin_memory,
            "cache_on": str(cached.images.device), "results": results, "row": row}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="test_batch_size (default 200, --quick 16)")
    parser.add_argument("--workers", type=int, default=8, help="nThreads: loader workers, at most one per CPU")
    parser.add_argument("--passes", type=int, default=None, help="timed passes (default 2, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="64 images, batch 16, one timed pass")
    parser.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds adaptive")
    args = parser.parse_args(argv)
    fixed_malloc = not args.default_malloc and steady_malloc()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.batch = args.batch or (16 if args.quick else 200)
    args.passes = args.passes or (1 if args.quick else 2)
    classes_with_images, per_class = (64, 1) if args.quick else (CLASSES, args.images_per_class)
    device = torch.device(args.device)
    backends = configure_backends(False, device)  # as a run with the default deterministic = false
    env = {**environment([device]), "backends": backends, "fixed_malloc_thresholds": fixed_malloc}
    print(describe(env), flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        images = make_folder(os.path.join(root, "val"), classes_with_images, per_class)
        print(f"{images} JPEGs of {', '.join(f'{w}x{h}' for w, h in SIZES)} in {CLASSES} class folders, made in "
              f"{time.time() - started:.1f} s", flush=True)
        options = load_options(CONFIG, [f"dataPath={os.path.join(root, 'val')}", f"nThreads={args.workers}",
                                        f"test_batch_size={args.batch}", "teacher_weights=random",
                                        f"eval_cache={os.path.join(root, 'cache')}"])
        measured = measure_all(options, device, images, args.passes)  # its loader's workers end with it
    path = quant_path("auto")
    print(f"quant_path: {path}")
    finish(env, started, args.json, {"args": vars(args), "images": images, "quant_path": path, **measured})
    print(json.dumps(measured["row"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
