"""Synthetic image pools: the synthesis, the keyed cache (reuse, resuming to the same bytes, checks), the spec's checks
and the crops (utils/training/pools). Tiny pools on a random teacher: a few images, a few steps."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from utils.models import build_teacher
from utils.runs.config import load_options
from utils.system.errors import ConfigError, UserError
from utils.system.files import WriteError
from utils.system.stopping import RunInterrupted
from utils.training.losses import BNStatistics
from utils.training.pools import (
    PoolError,
    Synthesis,
    check_pool_options,
    focal_cross_entropy,
    load_pool,
    random_resized_crops,
)
from utils.training.pools.store import MANIFEST, SUMMARY

from ..conftest import CIFAR10_CONF
from .test_files import full_disk  # noqa: F401  (a fixture)

CPU = torch.device("cpu")


def spec_of(*sets):
    """The spec of a pool of 6 images in batches of 4 (the last one 2), 3 steps each."""
    return check_pool_options(load_options(CIFAR10_CONF, ["image_source=pool", "pool_size=6", "pool_batch=4",
                                                          "pool_iters=3", *sets]))


def random_teacher(seed: int = 0):
    torch.manual_seed(seed)
    return build_teacher("resnet20_cifar10", "random")[0]


@pytest.fixture(scope="module")
def teacher():
    return random_teacher()


def files_of(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_synthesis_lowers_the_bn_statistics_loss_and_records_it(tmp_path, teacher):
    pool = load_pool(spec_of("pool_iters=8"), teacher, str(tmp_path), CPU, "random")
    assert pool.images.shape == (6, 3, 32, 32) and pool.labels.shape == (6,)
    assert pool.labels.min() >= 0 and pool.labels.max() < 10
    summary = pool.summary
    assert summary["images"] == 6 and summary["batches"] == 2
    assert summary["final_bns"] < 0.5 * summary["initial_bns"]
    assert all(value < summary["initial_bns"] for value in summary["final_bns_per_batch"])
    assert 0 <= summary["teacher_acc"] <= 1 and summary["synthesis_seconds"] > 0
    with open(os.path.join(pool.folder, SUMMARY)) as f:
        assert json.load(f) == summary
    # the summary's loss is that of the stored images, measured again here
    bn_stats = BNStatistics(teacher)
    with torch.no_grad(), bn_stats.capture():
        teacher(pool.images[:4])
    assert bn_stats.loss().item() == pytest.approx(summary["final_bns_per_batch"][0], rel=1e-4)
    bn_stats.remove()


def test_focal_cross_entropy_weighs_hard_images_more():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = F.softmax(logits, dim=1)[[0, 1], [0, 2]]
    ce = -torch.log(p)
    assert focal_cross_entropy(logits, labels, 0.5, 0.0).item() == pytest.approx(0.5 * ce.mean().item())
    assert focal_cross_entropy(logits, labels, 10.0, 2.0).item() == pytest.approx(
        10 * ((1 - p) ** 2 * ce).mean().item())
    # a saturated softmax (p = 1 in float32) keeps its gradient finite, and beta = 0 is no term at all
    saturated = torch.tensor([[40.0, 0.0, 0.0]], requires_grad=True)
    focal_cross_entropy(saturated, torch.tensor([0]), 0.1, 0.5).backward()
    assert torch.isfinite(saturated.grad).all()
    assert focal_cross_entropy(logits, labels, 0.0, 0.5).item() == 0


def test_a_synthesis_loss_that_is_not_finite_stops_with_one_error(tmp_path, teacher, monkeypatch):
    import utils.training.pools.synthesis as synthesis_module

    monkeypatch.setattr(synthesis_module, "focal_cross_entropy", lambda logits, *args: logits.sum() * float("nan"))
    with pytest.raises(UserError, match=r"^pool: pool batch 1: the synthesis loss became nan at step 1 \(its terms: "
                                        r"bns [\d.e+]+, ce nan\); lower pool_lr or the loss weights$"):
        load_pool(spec_of(), teacher, str(tmp_path), CPU)
    (folder,) = [f for f in tmp_path.iterdir() if f.is_dir()]
    assert files_of(folder) == [MANIFEST]


def test_crops_keep_the_size_and_range_and_follow_their_generator():
    images = torch.randn(8, 3, 16, 16)
    first = random_resized_crops(images, torch.Generator().manual_seed(1), 0.5)
    again = random_resized_crops(images, torch.Generator().manual_seed(1), 0.5)
    other = random_resized_crops(images, torch.Generator().manual_seed(2), 0.5)
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, other)
    # bilinear resampling inside each image: no value beyond the image's own
    assert (first.amax(dim=(1, 2, 3)) <= images.amax(dim=(1, 2, 3)) + 1e-6).all()
    assert (first.amin(dim=(1, 2, 3)) >= images.amin(dim=(1, 2, 3)) - 1e-6).all()
    # a left-right ramp keeps its slope or reverses it (a flip), roughly half of each
    ramp = torch.linspace(0, 1, 16).expand(200, 3, 16, 16)
    slopes = random_resized_crops(ramp, torch.Generator().manual_seed(0), 0.5).diff(dim=3).mean(dim=(1, 2, 3))
    assert (slopes != 0).all() and 60 < (slopes < 0).sum() < 140


def test_a_pool_is_read_back_from_the_cache_without_synthesising_again(tmp_path, teacher, monkeypatch):
    spec = spec_of()
    built = load_pool(spec, teacher, str(tmp_path), CPU, "random")
    monkeypatch.setattr(Synthesis, "batch", lambda *args: pytest.fail("synthesised again"))
    read = load_pool(spec, teacher, str(tmp_path), CPU, "random")
    assert torch.equal(read.images, built.images) and torch.equal(read.labels, built.labels)
    assert read.summary == built.summary and read.folder == built.folder
    # pool_cache naming the pool's own folder reads it too
    assert torch.equal(load_pool(spec, teacher, built.folder, CPU).images, built.images)
    assert files_of(built.folder) == ["batch-00000.pt", "batch-00001.pt", MANIFEST, SUMMARY]
    # another seed is another pool
    monkeypatch.undo()
    assert load_pool(spec_of("pool_seed=1"), teacher, str(tmp_path), CPU).folder != built.folder


def test_an_interrupted_synthesis_resumes_to_the_same_bytes(tmp_path, teacher, monkeypatch):
    spec = spec_of("pool_size=9")  # batches of 4, 4 and 1
    straight = load_pool(spec, teacher, str(tmp_path / "straight"), CPU)
    real = Synthesis.batch

    def interrupted_at_the_second(self, index, size):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index, size)

    monkeypatch.setattr(Synthesis, "batch", interrupted_at_the_second)
    with pytest.raises(RunInterrupted, match="interrupted while synthesising the pool; the finished batches stay in "):
        load_pool(spec, teacher, str(tmp_path / "resumed"), CPU)
    (folder,) = [f for f in (tmp_path / "resumed").iterdir() if f.is_dir()]
    assert files_of(folder) == ["batch-00000.pt", MANIFEST]  # whole batches only, and no summary yet
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(Synthesis, "batch", lambda self, index, size: calls.append(index) or real(self, index, size))
    resumed = load_pool(spec, teacher, str(tmp_path / "resumed"), CPU)
    assert calls == [1, 2]
    assert torch.equal(resumed.images, straight.images) and torch.equal(resumed.labels, straight.labels)
    assert resumed.summary["final_bns"] == straight.summary["final_bns"]


def test_pool_cache_off_keeps_the_pool_in_memory_only(tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("GRANQ_CACHE", str(tmp_path))
    pool = load_pool(spec_of(), teacher, "off", CPU)
    assert pool.folder is None and pool.images.shape[0] == 6 and os.listdir(tmp_path) == []
    assert torch.equal(pool.images, load_pool(spec_of(), teacher, str(tmp_path / "cache"), CPU).images)


def test_lbns_synthesises_class_centres_first_and_pulls_deep_layers_to_their_statistics(tmp_path, teacher):
    spec = spec_of("pool_lbns_weight=0.02", "pool_bns_weight=0.4", "pool_center_iters=2", "pool_aug_prob=1")
    pool = load_pool(spec, teacher, str(tmp_path), CPU)
    # 10 classes in batches of 4: 0-3, 4-7, then 8, 9 and two of class 0
    assert files_of(pool.folder) == ["batch-00000.pt", "batch-00001.pt", "centres-00000.pt", "centres-00001.pt",
                                     "centres-00002.pt", MANIFEST, SUMMARY]
    centres = [torch.load(os.path.join(pool.folder, f"centres-0000{i}.pt"), weights_only=True) for i in range(3)]
    assert centres[2]["labels"].tolist() == [8, 9, 0, 0]
    assert torch.isfinite(pool.images).all() and pool.summary["final_bns"] < pool.summary["initial_bns"]
    # the targets pooled over the centre batches are the statistics of all centre images at once
    synthesis = Synthesis(spec, teacher, CPU, show_progress=False)
    synthesis.set_centres([c["images"] for c in centres])
    with torch.no_grad(), synthesis.bn_stats.capture():
        teacher(torch.cat([c["images"] for c in centres]))
    for (mean, var), (target_mean, target_var) in zip(synthesis.bn_stats.batch_statistics(), synthesis.centre_targets):
        assert torch.allclose(mean, target_mean, atol=1e-4) and torch.allclose(var, target_var, rtol=1e-4, atol=1e-4)
    synthesis.close()


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def built(tmp_path, teacher):
    return load_pool(spec_of(), teacher, str(tmp_path), CPU, "random")


def test_a_truncated_batch_is_a_damaged_pool(built, teacher):
    path = os.path.join(built.folder, "batch-00001.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(PoolError, match=rf"^the pool in {built.folder} is damaged \(batch-00001.pt: cannot be read: "
                                        rf".*\); delete that folder to synthesise the pool again"):
        load_pool(spec_of(), teacher, os.path.dirname(built.folder), CPU)


def test_changed_images_are_a_checksum_mismatch(built, teacher):
    path = os.path.join(built.folder, "batch-00000.pt")
    record = torch.load(path, weights_only=True)
    record["images"][0, 0, 0, 0] += 1
    torch.save(record, path)
    with pytest.raises(PoolError, match=r"damaged \(batch-00000.pt: checksum mismatch\)"):
        load_pool(spec_of(), teacher, os.path.dirname(built.folder), CPU)


def test_an_unreadable_manifest_is_a_damaged_pool(built, teacher):
    with open(os.path.join(built.folder, MANIFEST), "w") as f:
        f.write("{")
    with pytest.raises(PoolError, match=r"damaged \(manifest.json: cannot be read: "):
        load_pool(spec_of(), teacher, os.path.dirname(built.folder), CPU)


def test_a_pool_of_another_teacher_or_other_settings_is_refused(built):
    with pytest.raises(PoolError, match=rf"^pool_cache: {built.folder} holds a pool built for another teacher "
                                        r"\(resnet20_cifar10 with weights of SHA-256 \w{16}\.\.\., from random\); this "
                                        r"run's teacher is resnet20_cifar10 with weights of SHA-256 \w{16}\.\.\.: "):
        load_pool(spec_of(), random_teacher(seed=1), built.folder, CPU)
    with pytest.raises(PoolError, match=r"holds a pool made with other settings \(pool_iters = 3 there, 4 here\)"):
        load_pool(spec_of("pool_iters=4"), random_teacher(), built.folder, CPU)


def test_a_full_disk_keeps_the_finished_batches_and_leaves_no_partial_file(tmp_path, teacher, full_disk,  # noqa: F811
                                                                            monkeypatch):
    from utils.system import files

    real = files.atomic_write_bytes

    def filling_up(data, path):  # the disk fills up when the second batch is written
        full_disk["room"] = 10 if path.endswith("batch-00001.pt") else 10 ** 9
        return real(data, path)

    monkeypatch.setattr(files, "atomic_write_bytes", filling_up)
    with pytest.raises(WriteError, match=r"batch-00001.pt: the disk is full \(.*\); the pool's finished batches "
                                         r"stay in .*: free some space and run again to resume its synthesis$"):
        load_pool(spec_of(), teacher, str(tmp_path), CPU)
    (folder,) = [f for f in tmp_path.iterdir() if f.is_dir()]
    assert files_of(folder) == ["batch-00000.pt", MANIFEST]  # no .tmp, no summary
    monkeypatch.setattr(files, "atomic_write_bytes", real)
    full_disk["room"] = 10 ** 9
    assert load_pool(spec_of(), teacher, str(tmp_path), CPU).summary["batches"] == 2


# -------------------------------------------------------------------------------------------------- the keys
@pytest.mark.parametrize("sets, message", [
    (["lr_G=0.01"], "image_source = pool trains no generator, so lr_G = 0.01 (default 0.001) would have no effect: "
                    "leave it at the default, or set image_source = generator"),
    (["generator=conditional_bn", "beta=2"], "so generator = 'conditional_bn' (default ''), beta = 2.0 (default "
                                             "1.0) would have no effect: leave them"),
    (["pool_batch=0"], "pool_batch = 0 must be at least 1"),
    (["pool_aug_scale=0"], "pool_aug_scale = 0.0 must be in (0, 1]"),
    (["pool_crop_scale=1.5"], "pool_crop_scale = 1.5 must be in (0, 1]"),
    (["pool_min_lr=1"], "pool_lr = 0.5 must be positive and at least pool_min_lr = 1.0"),
    (["pool_beta=0", "pool_bns_weight=0"], "are all 0: the pool's images would stay noise"),
    (["image_source=pools"], "image_source = 'pools' is not valid; choose one of: generator, pool"),
])
def test_pool_keys_are_checked(sets, message):
    with pytest.raises(ConfigError) as raised:
        load_options(CIFAR10_CONF, ["image_source=pool", *sets])
    assert message in str(raised.value)


def test_the_dataset_s_own_generator_may_be_named_in_a_pool_run():
    options = load_options(os.path.join(os.path.dirname(CIFAR10_CONF), "..", "ImageNet", "imagenet_res18.hocon"),
                           ["image_source=pool"])
    assert options.generator == "conditional_bn" and options.pool_lbns_weight == 0.02 and options.pool_aug_prob == 0.5
    assert load_options(CIFAR10_CONF, ["lr_G=0.01"]).lr_G == 0.01  # the generator's runs keep their keys
