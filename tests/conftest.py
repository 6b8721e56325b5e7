import io
import json
import os
import pathlib
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
CIFAR10_JPEG = os.path.join(SHARED_DATA, "cifar10-test-jpeg", "test")
RESNET20A_WEIGHTS = os.path.join(SHARED_DATA, "weights", "akamaster_resnet20-12fca82f.th")
PYTORCHCV_JPEG_WEIGHTS = os.path.join(SHARED_DATA, "weights", "resnet20_cifar10_pytorchcv_jpeg.pth")

needs_shared_data = pytest.mark.skipif(
    not (os.path.isdir(CIFAR10_JPEG) and os.path.isfile(RESNET20A_WEIGHTS)),
    reason="../shared/data (CIFAR-10 JPEG test set and ResNet-20 weights) is not beside the project",
)


def make_image_folder(root, classes: int, per_class: int, size: int, seed: int = 0) -> str:
    """A small ImageFolder of random RGB PNG images."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class{c:04d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """Runs set process-wide flags (utils.system.devices.configure_backends); later tests start from torch's own."""
    from utils.system.devices import set_tf32_settings, tf32_settings

    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    tf32 = tf32_settings()
    yield
    torch.use_deterministic_algorithms(saved[0])
    cudnn.deterministic, cudnn.benchmark = saved[1:3]
    set_tf32_settings(tf32)
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker computes with its share of the cores, it and the processes it starts
    (``OMP_NUM_THREADS``): N workers with every core each would only fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def shared_folder(tmp_path_factory) -> pathlib.Path:
    """A folder of this test session that every pytest-xdist worker sees (each worker's own temporary root is below
    it); without workers, the session's temporary root."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def eval_cache_in_tmp(tmp_path_factory):
    """The evaluation cache (``eval_cache = auto``) and the pool cache in a temporary folder that every worker shares
    (the caches lock what they build): tests never write to ~/.cache, and each test set is decoded once."""
    saved = os.environ.get("GRANQ_CACHE")
    os.environ["GRANQ_CACHE"] = str(shared_folder(tmp_path_factory) / "granq_cache")
    yield os.environ["GRANQ_CACHE"]
    if saved is None:
        os.environ.pop("GRANQ_CACHE", None)
    else:
        os.environ["GRANQ_CACHE"] = saved


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """``shared_run(name, argv)``: the summary of ``main.py argv`` (its ``save_path`` set to a folder of ``name``), run
    once per test session whichever worker asks first; the others wait for it under a file lock and read it. The
    run directory is shared: tests read it and write nothing into it."""
    root = shared_folder(tmp_path_factory) / "shared_runs"
    root.mkdir(exist_ok=True)

    def get(name: str, argv: list[str]) -> dict:
        folder, done = root / name, root / f"{name}.json"
        with FileLock(str(root / f"{name}.lock")):
            if not done.exists():
                code, lines = run_main([*argv, "--set", f"save_path={folder}"])
                assert code == 0, lines[-5:]
                done.write_text(lines[-1])
        return json.loads(done.read_text())

    return get


def post_training_args(qw: int, qa: int, act_mode: str, conf=None, weights=None, *sets) -> list[str]:
    """``main.py`` arguments of a post-training run (``nEpochs = 0``) on a shared teacher and the shared JPEG test set:
    the option-A teacher by default."""
    args = ["--conf_path", conf or CIFAR10A_CONF, "--id", "1", "--qw", str(qw), "--qa", str(qa)]
    for setting in (f"teacher_weights={weights or RESNET20A_WEIGHTS}", f"dataPath={CIFAR10_JPEG}", "nEpochs=0",
                    "nThreads=2", f"act_mode={act_mode}", *sets):
        args += ["--set", setting]
    return args


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cifar_folder"), classes=10, per_class=2, size=32)


def run_benchmark_script(name: str, cwd, *args, timeout: float = 1800):
    """Run ``bash benchmarks/NAME ARGS...`` in ``cwd`` with its results there ($RESULTS_DIR); fail with its output's end
    unless it exits 0. Returns the completed process."""
    env = {**os.environ, "RESULTS_DIR": str(cwd)}
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_main(argv):
    """Run the command line in-process; return (exit code, stdout lines)."""
    from utils.runs.run import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue().splitlines()


def last_json(lines):
    return json.loads(lines[-1])


CIFAR10_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20.hocon")
CIFAR10A_CONF = os.path.join(ROOT, "CIFAR", "cifar10_resnet20a.hocon")


def tiny_run_args(save_path, data_path, *extra, conf=CIFAR10_CONF):
    """Arguments of a short CPU run with a random teacher."""
    sets = [f"save_path={save_path}", f"dataPath={data_path}", "teacher_weights=random", "nEpochs=1",
            "iters_per_epoch=2", "batchSize=4", "warmup_epochs=0", "nThreads=0", "test_batch_size=8"]
    args = ["--conf_path", conf, "--id", "1", "--qw", "4", "--qa", "4"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


@pytest.fixture
def torch_hub(tmp_path, monkeypatch):
    """torch.hub's cache in tmp_path, and its download (the network boundary) serving random weights."""
    import torchvision.models

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    urls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        urls.append(url)
        name = next(n for n in torchvision.models.list_models(module=torchvision.models)
                    if torchvision.models.get_model_weights(n).DEFAULT.url == url)
        # What torchvision publishes for the auxiliary-head models includes the heads.
        kwargs = {"aux_logits": True, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        torch.save(torchvision.models.get_model(name, **kwargs).state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return tmp_path / "hub", urls
