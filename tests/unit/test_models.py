import os
import shutil
import zipfile

import pytest
import torch

import utils.models as models
from utils.errors import UserError
from utils.models import build_teacher, get_model_spec, model_names

from ..conftest import PYTORCHCV_JPEG_WEIGHTS, RESNET20A_WEIGHTS, needs_shared_data


def test_unknown_network_lists_known_ones():
    with pytest.raises(UserError, match="unknown network 'resnet21'.*resnet20_cifar10.*resnet20a_cifar10"):
        get_model_spec("resnet21")


@pytest.mark.parametrize("name", model_names())
def test_registered_models_build_and_run(name):
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
    assert calls == [(models.RESNET20A_URL, "12fca82f")]
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
