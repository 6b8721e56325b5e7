"""The test set decoded once: evaluation reads a uint8 array instead of decoding every image again.

The first time a test set is needed, each image is decoded once with the run's resize and centre crop (no
normalisation) and stored as one uint8 array ``[N, 3, H, W]`` with its labels, in one file under the cache
directory (``eval_cache = auto``: ``$GRANQ_CACHE``, else ``~/.cache/granq/eval``). Later evaluations, later
runs and concurrent runs read that file; one process builds it under a file lock while the others wait.
The file's key covers the test set's root, its files (names, sizes, modification times) and the transform
(resize, crop, interpolation), so a changed test set or transform gets a new file.

Batches are normalised on the evaluation device with the operations of ``ToTensor`` and ``Normalize``
(float32: divide by 255, subtract the mean, divide by the standard deviation), so each one equals the
decoding loader's batch bit for bit.

File layout: a header of ``HEADER_BYTES`` (a magic line, then JSON: the key, shape, byte counts and the
SHA-256 of everything after the header), the images, then the labels (int64, little-endian). A file that
does not match its header is rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import Dataset, Subset, default_collate
from torchvision import transforms

from ..system import files
from .images import UnreadableImage
from .workers import WorkerLoader, evaluation_workers

__all__ = ["CACHE_ENV", "EVAL_CACHE_MODES", "GPU_MEMORY_SHARE", "CachedLoader", "cache_directory",
           "cached_test_loader"]

logger = logging.getLogger(__name__)

EVAL_CACHE_MODES = ("auto", "off")  # besides a directory
CACHE_ENV = files.CACHE_ENV  # where ``auto`` keeps the files; default DEFAULT_DIRECTORY
DEFAULT_DIRECTORY = os.path.join("~", ".cache", "granq", "eval")
# The cached images stay on the GPU when they take at most this share of its free memory when the loader is
# built; otherwise each batch is copied from pinned host memory. ImageNet's 50,000 validation images at
# 224 x 224 are 7.5 GB: on the GPU where 30 GB are free, or where each of 8 torchrun ranks has 3.8 GB free.
GPU_MEMORY_SHARE = 0.25
FORMAT = 1
MAGIC = b"GRANQ-EVAL-CACHE\n"
HEADER_BYTES = 4096
HEADER_KEYS = ("format", "key", "count", "shape", "images_bytes", "labels_bytes", "sha256")
READ_CHUNK_BYTES = 64 << 20  # read and checksummed in pieces: a rank never holds more than its share at once
INDEX = "index.json"  # per root, what was cached before: says why a new file is built
PROGRESS_SECONDS = 30  # between progress lines while a test set is decoded


class DamagedCache(Exception):
    """A cache file that does not match its header: truncated, corrupted or written for another key."""


class CacheUnwritable(Exception):
    """The cache directory cannot take the file (not writable, disk full)."""


@contextlib.contextmanager
def _writing(where: str):
    """File-system errors inside become CacheUnwritable; errors decoding an image stay what they are."""
    try:
        yield
    except OSError as error:
        raise CacheUnwritable(f"{where}: {error}") from error


def cache_directory(setting: str) -> str | None:
    """The folder that ``eval_cache = setting`` keeps its files in; None for ``off``."""
    return files.cache_directory(setting, DEFAULT_DIRECTORY)


def _source_files(dataset) -> tuple[str, list[str]]:
    """The root folder and the files a test set is read from: an ImageFolder's images, torchvision CIFAR's
    test batch."""
    if hasattr(dataset, "samples"):
        return dataset.root, [path for path, _ in dataset.samples]
    folder = os.path.join(dataset.root, dataset.base_folder)
    return folder, [os.path.join(folder, name) for name, _ in dataset.test_list]


def _describe(dataset, preset) -> dict:
    """What the cached array depends on, and its key (a SHA-256 of all of it)."""
    root, files = _source_files(dataset)
    listing = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        listing.update(f"{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    described = {"root": os.path.realpath(root), "file_count": len(files), "files_sha256": listing.hexdigest(),
                 "transform": {"resize": preset.resize, "crop": preset.crop, "interpolation": preset.interpolation}}
    text = json.dumps({"format": FORMAT, **described}, sort_keys=True)
    return {"key": hashlib.sha256(text.encode()).hexdigest(), **described}


def _transform_text(transform: dict) -> str:
    if transform["resize"] is None and transform["crop"] is None:
        return "images as stored"
    return f"resize {transform['resize']}, crop {transform['crop']}, {transform['interpolation']}"


def _entry_path(directory: str, described: dict) -> str:
    name = f"{os.path.basename(described['root'])}-{_transform_text(described['transform'])}"
    return os.path.join(directory, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{described['key'][:16]}.u8")


# --------------------------------------------------------------------------------------------- reading
def _read_header(f, size: int) -> dict:
    raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
        raise DamagedCache(f"no header ({size} bytes)")
    try:
        header = json.loads(raw[len(MAGIC):].rstrip(b" "))
        expected = HEADER_BYTES + header["images_bytes"] + header["labels_bytes"]
        if not set(HEADER_KEYS) <= header.keys():
            raise KeyError(set(HEADER_KEYS) - header.keys())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCache("unreadable header") from None
    if size != expected:
        raise DamagedCache(f"truncated: {size} of {expected} bytes" if size < expected
                           else f"{size} bytes where the header says {expected}")
    return header


def _placement(nbytes: int, device: torch.device) -> tuple[torch.device, bool]:
    """Where cached images of ``nbytes`` live for evaluation on ``device``: (device, pinned host memory)."""
    if device.type != "cuda":
        return torch.device("cpu"), False
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= GPU_MEMORY_SHARE * free:
        return device, False
    logger.info("eval cache: %.2f GB is more than %.0f%% of the %.1f GB free on %s: batches come from pinned "
                "host memory", nbytes / 1e9, 100 * GPU_MEMORY_SHARE, free / 1e9, device)
    return torch.device("cpu"), True


def _load(path: str, described: dict, count: int, rows: list[int] | None,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of ``rows`` (ascending; None: all), checked against the file's checksum."""
    with open(path, "rb") as f:
        header = _read_header(f, os.fstat(f.fileno()).st_size)
        if header["format"] != FORMAT or header["key"] != described["key"] or header["count"] != count:
            raise DamagedCache("written for another test set or transform")
        shape = tuple(header["shape"])
        rows = list(range(count)) if rows is None else rows
        keep = torch.zeros(count, dtype=torch.bool)
        keep[rows] = True
        place, pinned = _placement(len(rows) * math.prod(shape), device)
        images = torch.empty((len(rows), *shape), dtype=torch.uint8, device=place, pin_memory=pinned)
        digest = hashlib.sha256()
        per_chunk = max(1, READ_CHUNK_BYTES // math.prod(shape))
        buffer = np.empty((min(per_chunk, count), *shape), dtype=np.uint8)
        filled = 0
        for start in range(0, count, per_chunk):
            chunk = buffer[:min(per_chunk, count - start)]
            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise DamagedCache("shorter than its header says")
            digest.update(chunk)
            mine = torch.from_numpy(chunk)[keep[start:start + len(chunk)]]
            images[filled:filled + len(mine)].copy_(mine)
            filled += len(mine)
        labels = f.read(header["labels_bytes"])
        digest.update(labels)
    if digest.hexdigest() != header["sha256"]:
        raise DamagedCache("checksum mismatch")
    labels = torch.from_numpy(np.frombuffer(labels, dtype="<i8").astype(np.int64))
    return images, labels[rows]


# --------------------------------------------------------------------------------------------- building
def _check_space(directory: str, nbytes: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise CacheUnwritable(f"{directory}: {nbytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")


class _Decoding(Dataset):
    """``dataset``'s items, where an image that cannot be read comes as its error message instead: the build
    goes on, so that one pass counts every unreadable file."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UnreadableImage as error:
            return str(error), -1


def _collate(items: list):
    """A batch of images and labels, or (the error messages of its unreadable images, None)."""
    unreadable = [image for image, _ in items if isinstance(image, str)]
    return (unreadable, None) if unreadable else default_collate(items)


def _build(path: str, described: dict, dataset, pil_steps: list, options) -> None:
    """Decode every image of ``dataset`` once (resize and crop only) into the file ``path``, atomically."""
    decoding = copy.copy(dataset)
    decoding.transform = transforms.Compose([*pil_steps, transforms.PILToTensor()])
    # Decoding is the slow part: as many workers as evaluation has. Their seeds come from a generator of their
    # own, not from the run's random stream, and they leave stop signals to this process.
    workers = evaluation_workers(options.nThreads)
    loader = WorkerLoader(_Decoding(decoding), batch_size=options.test_batch_size, num_workers=workers,
                          collate_fn=_collate)
    directory = os.path.dirname(path)
    started, done, labels, digest, unreadable = time.time(), 0, [], hashlib.sha256(), []
    reported = started
    with _writing(directory):
        fd, temp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with _writing(temp):
                f.write(bytes(HEADER_BYTES))
            for images, targets in loader:
                if targets is None or unreadable:  # after an unreadable image, only count the others
                    unreadable += images if targets is None else []
                    continue
                if not done:
                    _check_space(directory, len(dataset) * images[0].numel())
                data = images.contiguous().numpy()
                digest.update(data)
                with _writing(temp):
                    f.write(data)
                labels.append(targets)
                done += len(images)
                if time.time() - reported > PROGRESS_SECONDS and done < len(dataset):
                    reported = time.time()
                    logger.info("eval cache: %d of %d images decoded", done, len(dataset))
            if unreadable:
                raise UnreadableImage(f"{unreadable[0]}; {len(unreadable)} of the {len(dataset)} images in "
                                      f"{described['root']} cannot be read")
            labels = torch.cat(labels).numpy().astype("<i8").tobytes()
            digest.update(labels)
            header = {"format": FORMAT, "key": described["key"], "count": len(dataset), "shape": list(images.shape[1:]),
                      "images_bytes": done * images[0].numel(), "labels_bytes": len(labels),
                      "sha256": digest.hexdigest(), "root": described["root"], "transform": described["transform"]}
            text = MAGIC + json.dumps(header).encode()
            with _writing(temp):
                f.write(labels)
                f.seek(0)
                f.write(text.ljust(HEADER_BYTES, b" "))
                f.flush()
                os.fsync(f.fileno())
        with _writing(path):
            os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temp)
    logger.info("eval cache: %d images decoded in %.1f s into %s (%.2f GB)", done, time.time() - started, path,
                os.path.getsize(path) / 1e9)


def _read_index(directory: str) -> dict:
    try:
        with open(os.path.join(directory, INDEX)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # it only explains why a file is built


def _why(directory: str, described: dict) -> str:
    """Why no cached file fits: a first use, changed files or another transform."""
    earlier = _read_index(directory).get(described["root"], [])
    same = [entry for entry in earlier if entry["transform"] == described["transform"]]
    if same:
        return (f"the test set changed: {described['file_count']} files now, {same[-1]['file_count']} when "
                f"{same[-1]['entry']} was built, names, sizes or modification times differ")
    if earlier:
        files = "" if earlier[-1]["files_sha256"] == described["files_sha256"] else "; the test set changed too"
        return (f"the transform changed: {_transform_text(described['transform'])}, cached before "
                f"{_transform_text(earlier[-1]['transform'])}{files}")
    return f"first use of this test set with {_transform_text(described['transform'])}"


def _remember(directory: str, described: dict, path: str) -> None:
    index_path = os.path.join(directory, INDEX)
    with _writing(index_path), FileLock(index_path + ".lock"):
        index = _read_index(directory)
        entries = [entry for entry in index.get(described["root"], [])
                   if entry["transform"] != described["transform"]]
        entries.append({"transform": described["transform"], "files_sha256": described["files_sha256"],
                        "file_count": described["file_count"], "entry": os.path.basename(path)})
        index[described["root"]] = entries
        fd, temp = tempfile.mkstemp(dir=directory, prefix=INDEX + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(temp, index_path)


@contextlib.contextmanager
def _build_lock(path: str):
    lock = FileLock(path + ".lock")
    with _writing(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("eval cache: waiting for another process that is building %s", path)
            lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _open(path: str, described: dict, dataset, rows, pil_steps: list, options, device: torch.device):
    with contextlib.suppress(OSError, DamagedCache):  # missing or unreadable: the lock decides
        return _load(path, described, len(dataset), rows, device)  # no lock: files are replaced atomically
    with _build_lock(path):
        try:
            return _load(path, described, len(dataset), rows, device)  # another process built it meanwhile
        except FileNotFoundError:
            reason = _why(os.path.dirname(path), described)
        except (DamagedCache, OSError) as error:
            logger.warning("eval cache: %s is damaged (%s): building it again", path, error)
            reason = "the cached file was damaged"
        logger.info("eval cache: decoding the %d test images in %s once, into %s (%s)", len(dataset),
                    described["root"], path, reason)
        _build(path, described, dataset, pil_steps, options)
        try:
            _remember(os.path.dirname(path), described, path)
        except CacheUnwritable as error:  # the file is there; only the next explanation is lost
            logger.debug("eval cache: index not updated (%s)", error)
    return _load(path, described, len(dataset), rows, device)


def cached_test_loader(options, dataset, preset, pil_steps: list, device: torch.device | None):
    """The :class:`CachedLoader` of ``dataset`` (a test set, or its share under torchrun as a ``Subset``), or
    None where ``options.eval_cache`` is ``off`` or the cache cannot be written (one warning line).

    ``preset`` (:class:`~utils.models.EvalTransform`) gives the key's transform and the normalisation,
    ``pil_steps`` the resize and crop the images get before they are stored.
    """
    directory = cache_directory(options.eval_cache)
    full, rows = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else (dataset, None)
    if directory is None or len(full) == 0:
        return None
    device = torch.device("cpu") if device is None else torch.device(device)
    if rows is not None and rows != sorted(set(rows)):
        raise ValueError("the cache keeps a share of the test set in its order: ascending indices only")
    described = _describe(full, preset)
    path = _entry_path(directory, described)
    try:
        images, labels = _open(path, described, full, rows, pil_steps, options, device)
    except CacheUnwritable as error:
        logger.warning("eval cache: cannot write the decoded test set (%s): decoding it at every evaluation "
                       "instead", error)
        return None
    logger.info("eval cache: %d test images from %s (%.2f GB, on %s%s)", len(labels), path,
                images.numel() / 1e9, images.device, ", pinned" if images.is_pinned() else "")
    return CachedLoader(images, labels, options.test_batch_size, preset.mean, preset.std, device, dataset)


class CachedLoader:
    """Batches of ``batch_size`` normalised images and their labels on ``device``, in the order of the decoding
    loader, made from the cached uint8 ``images`` with the operations of ``ToTensor`` and ``Normalize``.

    ``dataset`` is the decoding dataset the images came from (its classes and files; one image decoded by
    index), as ``DataLoader.dataset`` is.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean, std,
                 device: torch.device, dataset):
        self.images, self.labels = images, labels.to(device)
        self.batch_size, self.device, self.dataset = batch_size, device, dataset
        # Tensors on the device, not Python numbers: CUDA divides by a Python number as a multiplication by its
        # reciprocal, which can differ in the last bit from ToTensor's division.
        self._scale = torch.tensor(255.0, device=device)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            images = self.images[start:start + self.batch_size].to(self.device, non_blocking=True)
            # ToTensor: float32, divided by 255; Normalize: minus the mean, divided by the std, per channel
            normalised = images.to(torch.float32).div_(self._scale).sub_(self._mean).div_(self._std)
            yield normalised, self.labels[start:start + self.batch_size].clone()
