import hashlib
import io
import multiprocessing
import os
import pickle
import tarfile
import time
import zipfile

import numpy as np
import torch

from utils.system.locks import fetch_lock, held_elsewhere, try_lock

PYTORCHCV_NAME = "resnet20_cifar10"
CHUNKS = 4  # a fake download writes its file in this many pieces ...
CHUNK_PAUSE_S = 0.25  # ... with this pause after each: slow enough that two processes overlap


def slow_write(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` in place, piece by piece, as a download over the network does."""
    step = -(-len(data) // CHUNKS)
    with open(path, "wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start:start + step])
            f.flush()
            time.sleep(CHUNK_PAUSE_S)


def fake_downloads(folder) -> dict:
    """What the fake pytorchcv and CIFAR-10 servers serve: the archives' bytes and their checksums."""
    from pytorchcv.models.common.model_store import get_model_name_suffix_data

    from utils.models import get_model_spec

    error, sha1, _ = get_model_name_suffix_data(PYTORCHCV_NAME)
    weights_name = f"{PYTORCHCV_NAME}-{error}-{sha1[:8]}.pth"
    weights = io.BytesIO()
    torch.save(get_model_spec(PYTORCHCV_NAME).build().state_dict(), weights)
    weights_zip = io.BytesIO()
    with zipfile.ZipFile(weights_zip, "w") as zf:
        zf.writestr(weights_name, weights.getvalue())

    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": {"data": np.zeros((1, 3072), np.uint8), "labels": [0]} for i in range(1, 6)}
    batches["test_batch"] = {"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8),
                             "labels": [i % 10 for i in range(200)]}
    batches["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    files = {name: pickle.dumps(value) for name, value in batches.items()}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"weights_zip": weights_zip.getvalue(), "weights_sha1": hashlib.sha1(weights.getvalue()).hexdigest(),
            "cifar_tgz": archive.getvalue(), "cifar_md5": {n: hashlib.md5(d).hexdigest() for n, d in files.items()},
            "cache": str(folder / "models"), "data": str(folder / "data")}


def install_fake_downloads(served: dict, patch=setattr) -> list:
    """Replace the network boundary of pytorchcv and torchvision with slow fake servers of ``served``; the
    checksums they compare with become those of the fake files. ``patch``: ``setattr`` in a process of its own,
    ``monkeypatch.setattr`` in a test's. Returns the list the URLs fetched go to."""
    from pytorchcv.models.common import model_store
    from torchvision.datasets import CIFAR10
    from torchvision.datasets import utils as dataset_utils

    import utils.models.registry as models

    urls = []

    def pytorchcv_download(url, path=None, overwrite=False, sha1_hash=None, **kwargs):
        urls.append(url)
        slow_write(served["weights_zip"], path)
        return path

    def urlretrieve(url, filename, chunk_size=None):
        urls.append(url)
        slow_write(served["cifar_tgz"], filename)

    def check_sha1(path, sha1_hash):
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest() == served["weights_sha1"]

    patch(models, "MODEL_CACHE", served["cache"])
    patch(model_store, "_download", pytorchcv_download)
    patch(model_store, "_check_sha1", check_sha1)
    patch(dataset_utils, "_urlretrieve", urlretrieve)
    patch(dataset_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    md5 = served["cifar_md5"]
    patch(CIFAR10, "tgz_md5", hashlib.md5(served["cifar_tgz"]).hexdigest())
    patch(CIFAR10, "train_list", [[name, md5[name]] for name, _ in CIFAR10.train_list])
    patch(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    patch(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return urls


def fetch_teacher_and_test_set(served: dict, start, results) -> None:
    """In a fresh process: wait for the others at ``start``, then build the published teacher and the CIFAR-10
    test set as a run does; put what happened into ``results``."""
    from utils.data.loaders import build_test_loader
    from utils.models import build_teacher
    from utils.runs.config import load_options

    urls = install_fake_downloads(served)
    options = load_options(os.path.join(os.path.dirname(__file__), "..", "..", "CIFAR", "cifar10_resnet20.hocon"),
                           [f"dataPath={served['data']}", "nThreads=0", "teacher_weights="])
    start.wait()
    try:
        teacher, source = build_teacher(options.network, options.teacher_weights)
        loader = build_test_loader(options, torch.device("cpu"))
        results.put(("ok", os.path.basename(source), len(loader.dataset), urls))
    except Exception as error:
        results.put(("failed", f"{type(error).__name__}: {error}"))


def test_two_processes_fetch_the_same_teacher_and_test_set_at_once(tmp_path):
    served = fake_downloads(tmp_path)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=fetch_teacher_and_test_set, args=(served, start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(outcome[0] == "ok" for outcome in outcomes), outcomes
    weights_file = f"{PYTORCHCV_NAME}-0597-9b0024ac.pth"
    assert {outcome[1:3] for outcome in outcomes} == {(weights_file, 200)}
    # Each file was downloaded once: the process that waited found it.
    fetched = sorted(url.rsplit("/", 1)[1] for outcome in outcomes for url in outcome[3])
    assert fetched == ["cifar-10-python.tar.gz", f"{weights_file}.zip"]
    assert sorted(os.listdir(served["cache"])) == [weights_file, f"{PYTORCHCV_NAME}.lock"]


def test_a_held_lock_is_seen_by_others_and_released_with_its_holder(tmp_path):
    path = str(tmp_path / "cell" / "cell.lock")
    assert not held_elsewhere(path)
    context = multiprocessing.get_context("spawn")
    holding, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock, args=(path, holding, release))
    holder.start()
    assert holding.wait(timeout=120)
    assert held_elsewhere(path) and try_lock(path) is None
    release.set()
    holder.join(timeout=60)
    lock = try_lock(path)
    assert lock is not None
    lock.release()


def hold_lock(path, holding, release) -> None:
    lock = try_lock(path)
    holding.set()
    release.wait(timeout=120)
    lock.release()


def test_fetch_lock_in_a_folder_that_cannot_hold_it_runs_unlocked(tmp_path, monkeypatch):
    import utils.system.locks as locks

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(locks.FileLock, "acquire", read_only)
    ran = []
    with fetch_lock(str(tmp_path / "data" / "cifar-10-batches-py")):
        ran.append(True)
    assert ran == [True]
