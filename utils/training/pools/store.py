"""The pool cache: a pool is synthesised once, kept on disk batch by batch, and read by every run that asks for it.

``pool_cache = auto`` keeps pools under ``$GRANQ_CACHE`` (else ``~/.cache/granq/pools``), ``off`` synthesises the pool
in memory for this run only, and a directory is either a folder of pools or the folder of one pool (which must then be
the pool the run asks for). A pool's folder, ``pool-NETWORK-KEY/`` (KEY: the start of :meth:`.PoolSpec.key`), holds

- ``manifest.json``: the key, the spec, the teacher's SHA-256 and weights source; written first;
- ``centres-NNNNN.pt``: the batches of class centres, where ``pool_lbns_weight > 0``;
- ``batch-NNNNN.pt``: each batch of the pool once it is done: its images (float32, the teacher's normalised input),
  labels, the SHA-256 of both and what its synthesis recorded;
- ``summary.json``: written last, so that it marks a complete pool: the BN-statistics loss before and after, the
  teacher's accuracy on the assigned labels, the synthesis time.

Every file is written atomically (:mod:`utils.system.files`), so an interrupted synthesis leaves whole batches, and
the next one resumes after the last of them; a batch depends only on the spec and its index
(:mod:`.synthesis`), so the result is the bytes of an uninterrupted synthesis. One process synthesises a pool at a
time (a file lock beside the folder, :func:`utils.system.locks.fetching`); the others wait, then read it. A file that
cannot be read or whose checksum does not match, and a folder holding another teacher's or another spec's pool, end
in one error naming the folder and the fix; nothing is rebuilt behind the user's back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
from dataclasses import dataclass

import torch

from ...system import distributed
from ...system.errors import UserError
from ...system.files import WriteError, atomic_save, atomic_save_json, cache_directory
from ...system.locks import fetching
from ...system.stopping import RunInterrupted
from .spec import FORMAT, PoolSpec, check_pool_options
from .synthesis import Synthesis

__all__ = ["DEFAULT_DIRECTORY", "MANIFEST", "SUMMARY", "Pool", "PoolError", "load_pool", "pool_folder", "run_pool"]

logger = logging.getLogger("granq")

DEFAULT_DIRECTORY = os.path.join("~", ".cache", "granq", "pools")
MANIFEST, SUMMARY = "manifest.json", "summary.json"


class PoolError(UserError):
    """A pool folder that does not hold what this run needs: damaged, another teacher's, other settings."""


@dataclass
class Pool:
    """A pool's images ``[N, C, H, W]`` and labels ``[N]`` on the CPU, its summary, and its folder (None: in memory)."""

    images: torch.Tensor
    labels: torch.Tensor
    summary: dict
    folder: str | None = None


def pool_folder(setting: str, network: str, key: str) -> str | None:
    """The folder of the pool with ``key`` under ``pool_cache = setting``; None for ``off``."""
    directory = cache_directory(setting, DEFAULT_DIRECTORY)
    if directory is None or os.path.isfile(os.path.join(directory, MANIFEST)):
        return directory
    return os.path.join(directory, f"pool-{re.sub(r'[^A-Za-z0-9_.-]+', '_', network)}-{key[:16]}")


def load_pool(spec: PoolSpec, teacher: torch.nn.Module, setting: str, device: torch.device, teacher_source: str = "",
              log_interval: int = 50, show_progress: bool = True) -> Pool:
    """The pool of ``spec`` for ``teacher``: read from the cache, or synthesised on ``device`` (and, unless
    ``setting`` is ``off``, written there), resuming a synthesis that stopped. Call it on every rank."""
    teacher_sha256 = distributed.state_sha256(teacher)
    key = spec.key(teacher_sha256)
    manifest = {"format": FORMAT, "key": key, "teacher_sha256": teacher_sha256, "teacher_weights": teacher_source,
                "spec": spec.to_dict()}
    folder = pool_folder(setting, spec.network, key)
    if folder is None:
        return _Builder(spec, manifest, None).build(teacher, device, log_interval, show_progress)
    with fetching(folder):
        builder = _Builder(spec, manifest, folder)
        if not builder.check_manifest():
            builder.write(manifest, MANIFEST, atomic_save_json)
        if os.path.isfile(os.path.join(folder, SUMMARY)):
            return builder.read()
        return builder.build(teacher, device, log_interval, show_progress)


def run_pool(options, teacher: torch.nn.Module, device: torch.device, teacher_source: str = "") -> Pool | None:
    """The pool that ``options`` asks for (:func:`load_pool` with its keys), or None where ``image_source`` is not
    ``pool``; progress is shown by rank 0 only."""
    if options.image_source != "pool":
        return None
    return load_pool(check_pool_options(options), teacher, options.pool_cache, device, teacher_source,
                     options.log_interval, show_progress=distributed.rank() == 0)


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Builder:
    """Reads, checks and writes the files of one pool folder (``folder`` None: nothing is read or written)."""

    def __init__(self, spec: PoolSpec, manifest: dict, folder: str | None):
        self.spec, self.manifest, self.folder = spec, manifest, folder

    def _damaged(self, name: str, why: str) -> PoolError:
        return PoolError(f"the pool in {self.folder} is damaged ({name}: {why}); delete that folder to synthesise "
                         f"the pool again, or set pool_cache to another folder")

    def check_manifest(self) -> bool:
        """Whether the folder has a manifest (it must be this pool's); makes the folder where it has none."""
        path = os.path.join(self.folder, MANIFEST)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:
            raise PoolError(f"pool_cache: cannot create {self.folder} ({error.strerror}); set pool_cache to a folder "
                            f"you can write, or off") from None
        if not os.path.isfile(path):
            return False
        try:
            with open(path) as f:
                found = json.load(f)
            key, teacher, spec = found["key"], found["teacher_sha256"], found["spec"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self._damaged(MANIFEST, f"cannot be read: {error}") from None
        if key == self.manifest["key"]:
            return True
        if teacher != self.manifest["teacher_sha256"] or spec.get("network") != self.spec.network:
            raise PoolError(f"pool_cache: {self.folder} holds a pool built for another teacher ({spec.get('network')} "
                            f"with weights of SHA-256 {teacher[:16]}..., from {found.get('teacher_weights') or '?'}); "
                            f"this run's teacher is {self.spec.network} with weights of SHA-256 "
                            f"{self.manifest['teacher_sha256'][:16]}...: point pool_cache at a folder of pools (or "
                            f"auto) to use or build this teacher's pool")
        changed = [f"{name} = {spec.get(name)!r} there, {value!r} here" for name, value in self.spec.to_dict().items()
                   if spec.get(name) != value]
        raise PoolError(f"pool_cache: {self.folder} holds a pool made with other settings ("
                        f"{'; '.join(changed) or 'another file format'}): point pool_cache at a folder of pools (or "
                        f"auto), or change the settings to the pool's")

    def write(self, record, name: str, write=atomic_save) -> None:
        if self.folder is None:
            return
        try:
            write(record, os.path.join(self.folder, name))
        except WriteError as error:
            raise WriteError(f"{error}; the pool's finished batches stay in {self.folder}: free some space and run "
                             f"again to resume its synthesis", error.path, error.needed, error.free) from None

    def _read_batch(self, name: str, kind: str, index: int) -> dict:
        try:
            record = torch.load(os.path.join(self.folder, name), map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a truncated or foreign file
            raise self._damaged(name, f"cannot be read: {str(error).splitlines()[0]}") from None
        if not isinstance(record, dict) or not {"images", "labels", "sha256"} <= record.keys():
            raise self._damaged(name, "not a batch of a pool")
        if (record.get("key"), record.get("kind"), record.get("index")) != (self.manifest["key"], kind, index):
            raise self._damaged(name, "written for another pool or place")
        if _checksum(record["images"], record["labels"]) != record["sha256"]:
            raise self._damaged(name, "checksum mismatch")
        if not torch.isfinite(record["images"]).all():
            raise self._damaged(name, "images that are not finite")
        return record

    def _batch(self, kind: str, index: int, count: int, make) -> dict:
        """Batch ``index`` of ``count`` of ``kind`` (``batch`` or ``centres``): read where it was written, else made
        with ``make()`` and written."""
        name = f"{kind}-{index:05d}.pt"
        what = "pool batch" if kind == "batch" else "batch of class centres"
        if self.folder is not None and os.path.isfile(os.path.join(self.folder, name)):
            logger.info("pool: %s %d of %d already synthesised (%s)", what, index + 1, count, name)
            return self._read_batch(name, kind, index)
        logger.info("pool: synthesising %s %d of %d%s", what, index + 1, count,
                    f" into {self.folder}" if self.folder else " (pool_cache = off: kept in memory only)")
        record = make()
        record.update(format=FORMAT, key=self.manifest["key"], kind=kind, index=index,
                      sha256=_checksum(record["images"], record["labels"]))
        self.write(record, name)
        logger.info("pool: %s %d of %d done in %.1f s: BN-statistics loss %.4g -> %.4g, teacher accuracy on its "
                    "labels %.1f%%", what, index + 1, count, record["seconds"], record["initial_bns"],
                    record["final_bns"], 100 * record["teacher_acc"])
        return record

    def build(self, teacher, device: torch.device, log_interval: int, show_progress: bool) -> Pool:
        synthesis = Synthesis(self.spec, teacher, device, log_interval, show_progress)
        try:
            centres = []
            if self.spec.pool_lbns_weight > 0:
                count = synthesis.centre_batches()
                centres = [self._batch("centres", i, count, lambda i=i: synthesis.centres(i)) for i in range(count)]
                synthesis.set_centres([record["images"] for record in centres])
            sizes = self.spec.batches
            batches = [self._batch("batch", i, len(sizes), lambda i=i, size=size: synthesis.batch(i, size))
                       for i, size in enumerate(sizes)]
        except KeyboardInterrupt:
            kept = f"the finished batches stay in {self.folder}" if self.folder else "pool_cache = off keeps nothing"
            raise RunInterrupted(f"interrupted while synthesising the pool; {kept}: run the same command again to "
                                 f"resume", signal.SIGINT) from None
        finally:
            synthesis.close()
        summary = self._summarise(batches, centres, device)
        self.write(summary, SUMMARY, atomic_save_json)
        logger.info("pool: %d images, BN-statistics loss %.4g (from %.4g), teacher accuracy on the assigned labels "
                    "%.1f%%, %.0f s of synthesis%s", summary["images"], summary["final_bns"], summary["initial_bns"],
                    100 * summary["teacher_acc"], summary["synthesis_seconds"],
                    f"; in {self.folder}" if self.folder else "")
        return self._pool(batches, summary)

    def read(self) -> Pool:
        try:
            with open(os.path.join(self.folder, SUMMARY)) as f:
                summary = json.load(f)
        except (OSError, ValueError) as error:
            raise self._damaged(SUMMARY, f"cannot be read: {error}") from None
        if not isinstance(summary, dict) or summary.get("key") != self.manifest["key"]:
            raise self._damaged(SUMMARY, "written for another pool")
        sizes = self.spec.batches
        batches = [self._read_batch(f"batch-{i:05d}.pt", "batch", i) for i in range(len(sizes))]
        logger.info("pool: %d images read from %s (BN-statistics loss %.4g, teacher accuracy on the assigned labels "
                    "%.1f%%)", summary["images"], self.folder, summary["final_bns"], 100 * summary["teacher_acc"])
        return self._pool(batches, summary)

    def _pool(self, batches: list[dict], summary: dict) -> Pool:
        images, labels = torch.cat([b["images"] for b in batches]), torch.cat([b["labels"] for b in batches])
        if len(labels) != self.spec.pool_size:
            raise self._damaged(SUMMARY, f"{len(labels)} images where the spec has {self.spec.pool_size}")
        return Pool(images, labels, summary, self.folder)

    def _summarise(self, batches: list[dict], centres: list[dict], device: torch.device) -> dict:
        sizes = [len(b["labels"]) for b in batches]

        def mean(name):
            return sum(b[name] * n for b, n in zip(batches, sizes)) / sum(sizes)

        return {**self.manifest, "network": self.spec.network, "images": sum(sizes), "batches": len(batches),
                "initial_bns": mean("initial_bns"), "final_bns": mean("final_bns"), "teacher_acc": mean("teacher_acc"),
                "final_bns_per_batch": [b["final_bns"] for b in batches],
                "synthesis_seconds": sum(b["seconds"] for b in batches + centres), "device": str(device)}
