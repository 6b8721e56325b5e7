import os
import shutil
import zipfile

import pytest
import torch

import utils.models.registry as models
import utils.models.resnet_a as resnet_a
from utils.models import build_teacher, check_teacher, get_model_spec, model_names
from utils.system.errors import UserError

from ..conftest import PYTORCHCV_JPEG_WEIGHTS, RESNET20A_WEIGHTS, needs_shared_data

# The teachers of the shipped configs.
CONFIG_NETWORKS = ["resnet20_cifar10", "resnet20_cifar100", "resnet18", "resnet50", "mobilenetv2_w1", *model_names()]


def test_unknown_network_lists_every_form_without_building(monkeypatch):
    import pytorchcv.model_provider

    monkeypatch.setattr(pytorchcv.model_provider, "get_model", lambda *a, **k: pytest.fail("a model was built"))
    for name in ("resnet21", "torchvision:resnet19", "no/such:thing"):
        with pytest.raises(UserError) as caught:
            get_model_spec(name)
        message = str(caught.value)
        assert message.startswith(f"network = {name!r} is unknown. Give a pytorchcv classification model (e.g. "
                                  f"resnet20_cifar10")
        for form in ("torchvision:NAME", "torchvision:resnet18", "MODULE:FUNCTION", "mypkg.models:my_net",
                     "resnet20a_cifar10"):
            assert form in message
    with pytest.raises(UserError, match="; close names: resnet20_cifar10, "):
        get_model_spec("resnet20_cifar1")
    with pytest.raises(UserError, match="close names: torchvision:resnet18"):
        get_model_spec("torchvision:resnet19")


@pytest.mark.parametrize("name, expected", [
    ("resnet56_cifar100", ("cifar100", 100, 32, None)),
    ("wrn16_10_cifar10", ("cifar10", 10, 32, None)),
    ("resnet34", ("imagenet", 1000, 224, (256, 224))),
    ("inceptionv3", ("imagenet", 1000, 299, (342, 299))),  # pytorchcv's table: 299 pixels, crop ratio 0.875
    ("torchvision:mobilenet_v2", ("imagenet", 1000, 224, (232, 224))),  # torchvision's IMAGENET1K_V2 recipe
])
def test_the_name_gives_dataset_classes_and_size(name, expected):
    spec = get_model_spec(name)
    transform = spec.eval_transform and (spec.eval_transform.resize, spec.eval_transform.crop)
    assert (spec.dataset, spec.num_classes, spec.image_size, transform) == expected
    assert spec.name == name


def test_torchvision_transform_comes_from_the_weights():
    transform = get_model_spec("torchvision:efficientnet_b0").eval_transform
    assert (transform.resize, transform.crop, transform.interpolation) == (256, 224, "bicubic")
    assert transform.mean == (0.485, 0.456, 0.406) and transform.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", ["resnet20_svhn", "alphapose_fastseresnet101b_coco", "resnet18_cub"])
def test_pytorchcv_models_of_other_tasks_are_refused(name):
    with pytest.raises(UserError, match=f"pytorchcv's {name} is not an ImageNet or CIFAR classification model"):
        get_model_spec(name)


@pytest.mark.parametrize("name", CONFIG_NETWORKS)
def test_config_networks_build_and_run(name):
    spec = get_model_spec(name)
    model = spec.build().eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, spec.image_size, spec.image_size))
    assert logits.shape == (1, spec.num_classes)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_random_teacher_warns(caplog):
    teacher, source = build_teacher("resnet20_cifar10", "random")
    assert source == "random" and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert "RANDOM weights" in caplog.text


def test_pytorchcv_published_weights_through_mocked_download(model_cache, monkeypatch, tmp_path):
    """The real pytorchcv path runs; only the HTTP download and its hash check are replaced."""
    from pytorchcv.models.common import model_store

    reference = get_model_spec("resnet20_cifar10").build().state_dict()
    urls = []

    def fake_download(url, path=None, overwrite=False, sha1_hash=None, **kwargs):
        urls.append(url)
        inner = os.path.basename(path)[: -len(".zip")]
        saved = tmp_path / inner
        torch.save(reference, saved)
        with zipfile.ZipFile(path, "w") as zf:
            zf.write(saved, inner)
        return path

    monkeypatch.setattr(model_store, "_download", fake_download)
    monkeypatch.setattr(model_store, "_check_sha1", lambda *args: True)
    teacher, source = build_teacher("resnet20_cifar10", "")
    assert urls and urls[0].startswith("https://github.com/osmr/imgclsmob/releases/download/")
    assert os.path.basename(source).startswith("resnet20_cifar10-") and str(model_cache) in source
    assert all(torch.equal(v, reference[k]) for k, v in teacher.state_dict().items())


def test_published_download_failure_is_a_clear_error(model_cache, monkeypatch):
    from pytorchcv.models.common import model_store

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(model_store, "_download", offline)
    with pytest.raises(UserError, match="published weights of resnet20_cifar100.*set teacher_weights"):
        build_teacher("resnet20_cifar100", "")


def test_resnet20a_published_weights_through_mocked_download(model_cache, monkeypatch, tmp_path):
    source_file = tmp_path / "src.th"
    torch.save({"state_dict": {"module." + k: v for k, v in get_model_spec("resnet20a_cifar10").build()
                               .state_dict().items()}, "best_prec1": 0.0}, source_file)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copy(source_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    _, source = build_teacher("resnet20a_cifar10", "")
    assert calls == [(resnet_a.RESNET20A_URL, "12fca82f")]
    assert os.path.basename(source) == "resnet20-12fca82f.th"
    build_teacher("resnet20a_cifar10", "")  # second time from the cache
    assert len(calls) == 1


def test_teacher_weights_url_is_downloaded(model_cache, monkeypatch, tmp_path):
    state = get_model_spec("resnet20_cifar10").build().state_dict()
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, hash_prefix=None, progress=True: torch.save(state, dst))
    _, source = build_teacher("resnet20_cifar10", "https://example.org/w/resnet20.pth")
    assert source.endswith("resnet20.pth")


def test_missing_corrupt_and_foreign_weights(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_teacher("resnet20_cifar10", str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        build_teacher("resnet20_cifar10", str(corrupt))
    foreign = tmp_path / "foreign.pth"
    torch.save(get_model_spec("resnet20a_cifar10").build().state_dict(), foreign)
    with pytest.raises(UserError, match="does not fit network 'resnet20_cifar10'.*another architecture"):
        build_teacher("resnet20_cifar10", str(foreign))


@needs_shared_data
def test_shared_weights_load():
    teacher, _ = build_teacher("resnet20a_cifar10", RESNET20A_WEIGHTS)
    assert teacher.linear.out_features == 10
    if os.path.isfile(PYTORCHCV_JPEG_WEIGHTS):
        build_teacher("resnet20_cifar10", PYTORCHCV_JPEG_WEIGHTS)


# ------------------------------------------------------------------------------------------- torchvision
def test_torchvision_published_weights_through_mocked_download(torch_hub):
    hub, urls = torch_hub
    teacher, source = build_teacher("torchvision:resnet18", "")
    assert urls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert source == str(hub / "checkpoints" / "resnet18-f37072fd.pth")
    saved = torch.load(source)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
    build_teacher("torchvision:resnet18", "")  # from torch.hub's cache
    assert len(urls) == 1


def test_torchvision_auxiliary_heads_are_dropped(torch_hub):
    teacher, _ = build_teacher("torchvision:googlenet", "")
    assert teacher.aux1 is None and teacher.aux2 is None and teacher.transform_input
    assert not any(key.startswith("aux") for key in teacher.state_dict())


# ------------------------------------------------------------------------------------------ user models
def test_user_model_from_module_and_function(tmp_path):
    spec = get_model_spec("tests.e2e.user_models:tiny_net")
    assert (spec.dataset, spec.num_classes, spec.image_size, spec.fetch_published) == (None, None, None, None)
    weights = tmp_path / "tiny.pth"
    torch.save(spec.build().state_dict(), weights)
    teacher, source = build_teacher("tests.e2e.user_models:tiny_net", str(weights))
    assert source == str(weights)
    assert all(torch.equal(v, torch.load(weights)[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(UserError, match="'tests.e2e.user_models:tiny_net' has no published weights: set "
                                        "teacher_weights"):
        build_teacher("tests.e2e.user_models:tiny_net", "")


@pytest.mark.parametrize("name, message", [
    ("tests.e2e.no_such_module:net", "cannot import 'tests.e2e.no_such_module' .ModuleNotFoundError"),
    ("tests.e2e.user_models:no_such_function", "module 'tests.e2e.user_models' has no function 'no_such_function'"),
])
def test_user_model_that_cannot_be_found(name, message):
    with pytest.raises(UserError, match=message):
        get_model_spec(name)


def test_user_function_that_returns_no_module():
    with pytest.raises(UserError, match=r"not_a_model\(\) returned a str, not an nn.Module"):
        build_teacher("tests.e2e.user_models:not_a_model", "random")


def test_weights_of_another_shape_are_a_clear_error(tmp_path):
    state = get_model_spec("tests.e2e.user_models:tiny_net").build().state_dict()
    state["8.weight"] = torch.zeros(3, 16)
    path = tmp_path / "other_classes.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"1 of another shape \(e.g. \['8.weight'\]\)"):
        build_teacher("tests.e2e.user_models:tiny_net", str(path))


# ---------------------------------------------------------------------------------------- teacher check
def test_teacher_without_batchnorm_is_refused():
    teacher, _ = build_teacher("tests.e2e.user_models:tiny_net_without_batchnorm", "random")
    with pytest.raises(UserError, match="has no BatchNorm layer: the BN-statistics loss of the generator needs"):
        check_teacher(teacher, "tests.e2e.user_models:tiny_net_without_batchnorm", 10, 32)


def test_teacher_output_and_input_size_are_checked():
    teacher, _ = build_teacher("tests.e2e.user_models:tiny_net", "random")
    check_teacher(teacher, "tiny", 10, 32)
    with pytest.raises(UserError, match=r"returns \(1, 10\) for one 32x32 image where nClasses = 100"):
        check_teacher(teacher, "tiny", 100, 32)
    resnet, _ = build_teacher("resnet20_cifar10", "random")
    with pytest.raises(UserError, match="'resnet20_cifar10' cannot run on 64x64 images .RuntimeError: .*set img_size"):
        check_teacher(resnet, "resnet20_cifar10", 10, 64)
