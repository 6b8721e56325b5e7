import pytest
import torch

import utils.system.distributed as distributed
from utils.data.loaders import PREFETCH_BATCHES, build_test_loader, eval_transform, find_image_folder, normalization
from utils.data.workers import close_workers, evaluation_workers
from utils.runs.config import load_options
from utils.system.errors import UserError

from ..conftest import CIFAR10_CONF, CIFAR10_JPEG, ROOT, make_image_folder, needs_shared_data


def options(data_path, *sets):
    return load_options(CIFAR10_CONF, [f"dataPath={data_path}", "nThreads=0", "test_batch_size=4", *sets])


def test_image_folder_is_detected_and_normalised(cifar_folder):
    loader = build_test_loader(options(cifar_folder))
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert len(loader.dataset) == 20


def test_normalisation_defaults_and_overrides(cifar_folder):
    assert normalization(options(cifar_folder)) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    custom = options(cifar_folder, "norm_mean=[0, 0, 0]", "norm_std=[1, 1, 1]")
    images, _ = next(iter(build_test_loader(custom)))
    assert images.min() >= 0 and images.max() <= 1  # plain ToTensor values


def test_parent_with_val_folder(tmp_path):
    make_image_folder(tmp_path / "val", classes=10, per_class=1, size=32)
    assert find_image_folder(str(tmp_path)) == str(tmp_path / "val")


def test_wrong_number_of_classes(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class=1, size=32)
    with pytest.raises(UserError, match="has 3 class folders but nClasses = 10"):
        build_test_loader(options(tmp_path))


def test_empty_data_path():
    with pytest.raises(UserError, match="dataPath is empty"):
        build_test_loader(options(""))


def test_offline_cifar_download_is_a_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self, *args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(UserError, match="could not be downloaded.*ImageFolder"):
        build_test_loader(options(tmp_path / "empty"))


@needs_shared_data
def test_shared_cifar10_jpeg_set():
    loader = build_test_loader(options(CIFAR10_JPEG))
    assert len(loader.dataset) == 10000
    assert loader.dataset.classes[:3] == ["airplane", "automobile", "bird"]
    assert isinstance(next(iter(loader))[0], torch.Tensor)


def test_workers_persist_and_prefetch(cifar_folder, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    loader = build_test_loader(options(cifar_folder, "nThreads=8", "eval_cache=off"), torch.device("cpu"))
    assert loader.num_workers == 2  # at most one per CPU
    assert loader.persistent_workers and loader.prefetch_factor == PREFETCH_BATCHES
    assert not loader.pin_memory
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    without_workers = build_test_loader(options(cifar_folder, "eval_cache=off"), torch.device("cpu"))
    assert without_workers.num_workers == 0 and not without_workers.persistent_workers


@pytest.mark.parametrize("threads, local_ranks, workers", [(8, 4, 2), (8, 8, 1), (3, 8, 1), (0, 4, 0), (8, 1, 8)])
def test_torchrun_ranks_share_the_workers_of_a_machine(monkeypatch, threads, local_ranks, workers):
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert evaluation_workers(threads) == workers


def test_iterating_the_loader_draws_nothing_from_the_global_random_stream(cifar_folder, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    loader = build_test_loader(options(cifar_folder, "nThreads=2", "eval_cache=off"), torch.device("cpu"))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in range(2):
        list(loader)
    close_workers(loader)
    list(loader)  # new workers
    close_workers(loader)
    assert torch.equal(torch.rand(3), expected)


def test_batches_are_pinned_for_cuda_only(cifar_folder):
    # A device object is only a name: nothing runs on CUDA here.
    assert build_test_loader(options(cifar_folder, "eval_cache=off"), torch.device("cuda", 0)).pin_memory
    assert not build_test_loader(options(cifar_folder, "eval_cache=off"), torch.device("cpu")).pin_memory


def imagenet_folder(root, classes_with_images=(3,)):
    """1000 class folders, one 500x375 image in each of ``classes_with_images``."""
    from PIL import Image

    for index in range(1000):
        (root / f"n{index:08d}").mkdir(parents=True)
    for index in classes_with_images:
        Image.new("RGB", (500, 375), (200, 30, 90)).save(root / f"n{index:08d}" / "a.JPEG")
    return str(root)


@pytest.mark.parametrize("network, resize, crop", [
    ("resnet18", 256, 224),  # pytorchcv's table
    ("torchvision:resnet18", 256, 224),  # torchvision's IMAGENET1K_V1
    ("torchvision:mobilenet_v2", 232, 224),  # IMAGENET1K_V2
    ("torchvision:efficientnet_b0", 256, 224),
])
def test_test_images_are_prepared_as_the_network_was_evaluated(network, resize, crop, tmp_path):
    conf = f"{ROOT}/ImageNet/imagenet_res18.hocon"
    options = load_options(conf, [f"network={network}", f"dataPath={imagenet_folder(tmp_path)}", "nThreads=0"])
    steps = build_test_loader(options).dataset.transform.transforms
    assert (steps[0].size, steps[1].size) == (resize, (crop, crop))
    interpolation = eval_transform(options).interpolation
    assert steps[0].interpolation.value == interpolation == ("bicubic" if "efficientnet" in network else "bilinear")
    images, _ = next(iter(build_test_loader(options)))
    assert images.shape == (1, 3, crop, crop)
    assert normalization(options) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    override = load_options(conf, [f"network={network}", "norm_mean=[0.5, 0.5, 0.5]", "norm_std=[0.2, 0.2, 0.2]"])
    assert normalization(override) == ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert eval_transform(override).resize == resize


def test_user_model_on_imagenet_crops_its_image_size(tmp_path):
    options = load_options(f"{ROOT}/ImageNet/imagenet_res18.hocon", [
        "network=tests.e2e.user_models:tiny_net", "img_size=160", f"dataPath={imagenet_folder(tmp_path)}",
        "nThreads=0"])
    steps = build_test_loader(options).dataset.transform.transforms
    assert (steps[0].size, steps[1].size) == (183, (160, 160))  # 160 / 0.875, rounded up
