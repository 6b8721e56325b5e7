import io
import json
import os
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
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


@pytest.fixture(scope="session", autouse=True)
def eval_cache_in_tmp(tmp_path_factory):
    """The evaluation cache (``eval_cache = auto``) in a temporary folder: tests never write to ~/.cache."""
    saved = os.environ.get("GRANQ_CACHE")
    os.environ["GRANQ_CACHE"] = str(tmp_path_factory.mktemp("granq_cache"))
    yield os.environ["GRANQ_CACHE"]
    if saved is None:
        os.environ.pop("GRANQ_CACHE", None)
    else:
        os.environ["GRANQ_CACHE"] = saved


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cifar_folder"), classes=10, per_class=2, size=32)


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
