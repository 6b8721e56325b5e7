import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from utils.data import eval_cache
from utils.data.eval_cache import HEADER_BYTES, CachedLoader, cache_directory
from utils.data.loaders import build_test_loader
from utils.runs.config import load_options
from utils.system import distributed

from ..conftest import CIFAR10_CONF, CIFAR10_JPEG, ROOT, needs_shared_data

IMAGENET_CONF = os.path.join(ROOT, "ImageNet", "imagenet_res18.hocon")
SIZES = ((500, 375), (375, 500), (500, 333), (400, 300), (333, 500))


def imagenet_like(root, images: int = 10, seed: int = 0) -> str:
    """ImageNet's 1000 class folders, ``images`` JPEGs of varied sizes spread over them (smooth content
    with noise, so that resizing rounds in many ways)."""
    rng = np.random.default_rng(seed)
    for index in range(1000):
        os.makedirs(os.path.join(root, f"n{index:08d}"))
    for i in range(images):
        write_jpeg(os.path.join(root, f"n{7 * i % 1000:08d}", f"{i}.JPEG"), SIZES[i % len(SIZES)], rng)
    return str(root)


def write_jpeg(path, size, rng) -> None:
    width, height = size
    small = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
    pixels = np.asarray(small.resize(size, Image.BILINEAR), dtype=np.int16) + rng.integers(-20, 21, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)


def imagenet_options(root, cache, *sets):
    return load_options(IMAGENET_CONF, [f"dataPath={root}", "nThreads=0", "test_batch_size=4",
                                        f"eval_cache={cache}", *sets])


def entries(directory) -> list[str]:
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".u8"))


def assert_same_batches(options, device=None) -> CachedLoader:
    """Every batch of the cached loader equals the decoding loader's (``eval_cache = off``), bit for bit."""
    cached = build_test_loader(options, device)
    decoding = build_test_loader(dataclasses.replace(options, eval_cache="off"), device)
    assert isinstance(cached, CachedLoader) and isinstance(decoding, DataLoader)
    cached_batches, decoded_batches = list(cached), list(decoding)
    assert len(cached_batches) == len(decoded_batches) == len(cached) > 1
    for (images, labels), (decoded, decoded_labels) in zip(cached_batches, decoded_batches):
        assert images.device == torch.device(device or "cpu")
        assert images.dtype == decoded.dtype == torch.float32
        assert torch.equal(images, decoded.to(images.device))
        assert torch.equal(labels, decoded_labels.to(labels.device))
    return cached


# ------------------------------------------------------------------------------------------ same batches
@pytest.mark.parametrize("network, transform", [
    ("resnet18", "resize_256_crop_224_bilinear"),
    ("torchvision:efficientnet_b0", "resize_256_crop_224_bicubic"),
])
def test_imagenet_like_batches_equal_the_decoding_loader(network, transform, tmp_path):
    options = imagenet_options(imagenet_like(tmp_path / "val"), tmp_path / "cache", f"network={network}")
    cached = assert_same_batches(options)
    assert cached.images.dtype == torch.uint8 and cached.images.shape == (10, 3, 224, 224)
    [entry] = entries(tmp_path / "cache")
    assert os.path.basename(entry).startswith(f"val-{transform}-")


@needs_shared_data
def test_cifar10_jpeg_batches_equal_the_decoding_loader(tmp_path):
    # 30 images of each class of the shared JPEG test set; decoded with 2 workers, as a run does
    for name in sorted(os.listdir(CIFAR10_JPEG)):
        os.makedirs(tmp_path / "test" / name)
        for image in sorted(os.listdir(os.path.join(CIFAR10_JPEG, name)))[:30]:
            shutil.copy2(os.path.join(CIFAR10_JPEG, name, image), tmp_path / "test" / name / image)
    options = load_options(CIFAR10_CONF, [f"dataPath={tmp_path / 'test'}", "nThreads=2", "test_batch_size=64",
                                          f"eval_cache={tmp_path / 'cache'}"])
    cached = assert_same_batches(options)
    assert cached.images.shape == (300, 3, 32, 32) and len(cached) == 5


def fake_torchvision_cifar10(root, monkeypatch, count: int = 30) -> str:
    """torchvision's CIFAR-10 test batch of ``count`` random images in ``root``, accepted without its checksum."""
    import torchvision.datasets.cifar

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                     "labels": rng.integers(0, 10, count).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return str(root)


def test_torchvision_cifar_is_cached_too(tmp_path, monkeypatch, caplog):
    data = fake_torchvision_cifar10(tmp_path / "data", monkeypatch)
    options = load_options(CIFAR10_CONF, [f"dataPath={data}", "nThreads=0", "test_batch_size=8",
                                          f"eval_cache={tmp_path / 'cache'}"])
    assert_same_batches(options)
    # its test batch is the file the key covers
    os.utime(os.path.join(data, "cifar-10-batches-py", "test_batch"), ns=(1, 1))
    with caplog.at_level(logging.INFO):
        build_test_loader(options)
    assert "the test set changed" in caplog.text and len(entries(tmp_path / "cache")) == 2


def test_each_rank_keeps_its_own_share(tmp_path, monkeypatch):
    options = imagenet_options(imagenet_like(tmp_path / "val"), tmp_path / "cache", "test_batch_size=2")
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    labels = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        cached = assert_same_batches(options)
        assert len(cached.images) == len(range(rank, 10, 3))
        labels += cached.labels.tolist()
    assert len(entries(tmp_path / "cache")) == 1  # one file for all ranks
    assert sorted(labels) == sorted(7 * i % 1000 for i in range(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_gpu", [True, False])
def test_cuda_batches_equal_the_decoding_loader(on_gpu, tmp_path, monkeypatch):
    if not on_gpu:  # as when the images take more than the stated share of free GPU memory
        monkeypatch.setattr(eval_cache, "GPU_MEMORY_SHARE", 0.0)
    options = imagenet_options(imagenet_like(tmp_path / "val"), tmp_path / "cache")
    cached = assert_same_batches(options, torch.device("cuda", 0))  # the device a run evaluates on
    assert cached.images.is_cuda == on_gpu and cached.images.is_pinned() == (not on_gpu)


# ------------------------------------------------------------------------------------------ reuse and keys
def test_a_second_build_reads_the_file_without_decoding(tmp_path, monkeypatch, caplog):
    options = imagenet_options(imagenet_like(tmp_path / "val"), tmp_path / "cache")
    with caplog.at_level(logging.INFO):
        build_test_loader(options)
    assert "first use of this test set" in caplog.text
    [entry] = entries(tmp_path / "cache")
    written = os.stat(entry).st_mtime_ns

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(eval_cache, "_build", no_decoding)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loader = assert_same_batches(options)
    assert "decoding the" not in caplog.text and f"10 test images from {entry}" in caplog.text
    assert entries(tmp_path / "cache") == [entry] and os.stat(entry).st_mtime_ns == written
    assert len(loader) == 3


def test_a_changed_image_builds_a_new_entry(tmp_path, caplog):
    root = imagenet_like(tmp_path / "val")
    options = imagenet_options(root, tmp_path / "cache")
    build_test_loader(options)
    [first] = entries(tmp_path / "cache")
    write_jpeg(os.path.join(root, "n00000007", "1.JPEG"), (375, 500), np.random.default_rng(5))
    with caplog.at_level(logging.INFO):
        assert_same_batches(options)  # the new pixels, not the cached ones
    assert "the test set changed: 10 files now, 10 when" in caplog.text
    assert len(entries(tmp_path / "cache")) == 2 and first in entries(tmp_path / "cache")


def test_a_changed_transform_builds_a_new_entry(tmp_path, caplog):
    root = imagenet_like(tmp_path / "val")
    build_test_loader(imagenet_options(root, tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        cached = assert_same_batches(imagenet_options(root, tmp_path / "cache", "network=torchvision:mobilenet_v2"))
    assert ("the transform changed: resize 232, crop 224, bilinear, cached before resize 256, crop 224, "
            "bilinear)") in caplog.text
    assert len(entries(tmp_path / "cache")) == 2 and cached.images.shape[-1] == 224


def damage(path: str, how: str) -> None:
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) - 100)
        return
    offset = {"image byte": HEADER_BYTES + 1000, "label byte": os.path.getsize(path) - 1, "header": 0}[how]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("how, reason", [
    ("truncated", "truncated: "),
    ("image byte", "checksum mismatch"),
    ("label byte", "checksum mismatch"),
    ("header", "no header"),
])
def test_a_damaged_file_is_rebuilt(how, reason, tmp_path, caplog):
    options = imagenet_options(imagenet_like(tmp_path / "val"), tmp_path / "cache")
    build_test_loader(options)
    [entry] = entries(tmp_path / "cache")
    size = os.path.getsize(entry)
    damage(entry, how)
    with caplog.at_level(logging.INFO):
        assert_same_batches(options)
    assert f"{entry} is damaged ({reason}" in caplog.text
    assert "(the cached file was damaged)" in caplog.text
    assert entries(tmp_path / "cache") == [entry] and os.path.getsize(entry) == size


# ------------------------------------------------------------------------------------------ falling back
@pytest.mark.parametrize("failure", ["not a directory", "disk full", "write error"])
def test_an_unwritable_cache_falls_back_to_decoding(failure, tmp_path, monkeypatch, caplog):
    directory = tmp_path / "cache"
    if failure == "not a directory":
        (tmp_path / "file").write_text("")
        directory = tmp_path / "file" / "cache"
    elif failure == "disk full":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 10 ** 5))
    else:
        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
    options = imagenet_options(imagenet_like(tmp_path / "val"), directory)
    with caplog.at_level(logging.WARNING):
        loader = build_test_loader(options)
    assert isinstance(loader, DataLoader)
    [warning] = [record.getMessage() for record in caplog.records
                 if record.levelno >= logging.WARNING and record.name == "utils.data.eval_cache"]
    assert "cannot write the decoded test set" in warning and "decoding it at every evaluation" in warning
    assert ("GB needed" in warning) == (failure == "disk full")
    if os.path.isdir(directory):
        assert [name for name in os.listdir(directory) if name.endswith((".u8", ".tmp"))] == []


def test_off_and_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("GRANQ_CACHE", str(tmp_path / "auto"))
    root = imagenet_like(tmp_path / "val")
    assert isinstance(build_test_loader(imagenet_options(root, "off")), DataLoader)
    assert not os.path.exists(tmp_path / "auto")
    assert isinstance(build_test_loader(imagenet_options(root, "auto")), CachedLoader)
    assert len(entries(tmp_path / "auto")) == 1
    monkeypatch.delenv("GRANQ_CACHE")
    assert cache_directory("auto") == os.path.expanduser(os.path.join("~", ".cache", "granq", "eval"))
    assert cache_directory("~/elsewhere") == os.path.expanduser(os.path.join("~", "elsewhere"))


def test_tests_never_use_the_home_cache():
    assert not cache_directory("auto").startswith(os.path.expanduser("~/.cache"))


# ------------------------------------------------------------------------------------------ two processes
CONCURRENT = """
import hashlib, json, logging, os, sys, time
sys.path.insert(0, {root!r})
from utils.data import eval_cache
from utils.runs.config import load_options
from utils.data.loaders import build_test_loader

build = eval_cache._build


def slow_build(*args):  # long enough that the other process is sure to find the lock taken
    time.sleep(2)
    build(*args)


eval_cache._build = slow_build
logging.basicConfig(level=logging.INFO, format="%(message)s")
options = load_options({conf!r}, {sets!r})
open(os.path.join({ready!r}, sys.argv[1]), "w").close()
while len(os.listdir({ready!r})) < 2:
    time.sleep(0.01)
digest = hashlib.sha256()
for images, labels in build_test_loader(options):
    digest.update(images.numpy().tobytes() + labels.numpy().tobytes())
print(json.dumps({{"loader": type(build_test_loader(options)).__name__, "sha256": digest.hexdigest()}}))
"""


def test_two_processes_share_one_build(tmp_path):
    root = imagenet_like(tmp_path / "val", images=20)
    sets = [f"dataPath={root}", "nThreads=0", "test_batch_size=4", f"eval_cache={tmp_path / 'cache'}"]
    (tmp_path / "ready").mkdir()
    script = CONCURRENT.format(root=ROOT, conf=IMAGENET_CONF, sets=sets, ready=str(tmp_path / "ready"))
    processes = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    logs = "".join(err for _, err in outputs)
    assert logs.count("decoding the 20 test images") == 1
    assert logs.count("waiting for another process that is building") == 1
    decoding = hashlib.sha256()
    for images, labels in build_test_loader(load_options(IMAGENET_CONF, sets + ["eval_cache=off"])):
        decoding.update(images.numpy().tobytes() + labels.numpy().tobytes())
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    assert results == [{"loader": "CachedLoader", "sha256": decoding.hexdigest()}] * 2
    assert len(entries(tmp_path / "cache")) == 1
