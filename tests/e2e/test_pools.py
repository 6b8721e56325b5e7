"""Runs on a pool of synthetic images (``image_source = pool``) from the command line: what they train and record,
one pool read by every run of its teacher, each pool recipe, bad input as one ``error:`` line with no
run directory, ``tools/synthesize.py``, and synthesis on the shared teacher."""

import json
import os

import pytest
import torch

from utils.models import build_teacher
from utils.runs.config import load_options
from utils.runs.synthesize_cli import main as synthesize_main
from utils.system import files
from utils.training.pools import check_pool_options, load_pool

from ..conftest import (
    CIFAR10_CONF,
    CIFAR10A_CONF,
    RESNET20A_WEIGHTS,
    last_json,
    needs_shared_data,
    run_main,
    tiny_run_args,
)
from ..unit.test_files import full_disk  # noqa: F401  (a fixture)

# A pool of 16 images in batches of 8, two synthesis steps each.
POOL = ("image_source=pool", "pool_size=16", "pool_batch=8", "pool_iters=2", "quant_impl=eager")


def pool_args(save_path, data, *sets, conf=CIFAR10_CONF):
    return tiny_run_args(save_path, data, *[part for s in (*POOL, *sets) for part in ("--set", s)], conf=conf)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Random weights in a file, so that runs of any --id share a teacher (and so a pool)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(build_teacher("resnet20_cifar10", "random")[0].state_dict(), path)
    return str(path)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_runs_on_a_pool_train_without_a_generator_and_share_the_pool(tmp_path, cifar_folder, teacher_file, capsys):
    args = pool_args(tmp_path / "runs", cifar_folder, f"pool_cache={tmp_path / 'pools'}",
                     f"teacher_weights={teacher_file}")
    code, lines = run_main(args)
    assert code == 0
    assert "pool: synthesising pool batch 2 of 2" in capsys.readouterr().err
    summary = last_json(lines)
    assert summary["image_source"] == "pool" and summary["pool"]["images"] == 16
    assert os.path.dirname(summary["pool"]["folder"]) == str(tmp_path / "pools")
    checkpoint = torch.load(os.path.join(summary["run_dir"], "checkpoint.pt"), weights_only=False)
    assert "generator" not in checkpoint and "opt_G" not in checkpoint
    (record,) = records(summary["run_dir"])
    assert {"loss_S", "teacher_acc", "kd"} <= record.keys() and "loss_G" not in record and record["lr_G"] is None
    with open(os.path.join(summary["run_dir"], "train.log")) as f:
        assert "teacher acc on pool images" in f.read()
    # another seed and bit width of the same teacher read the same pool, and synthesise nothing
    code, lines = run_main(args + ["--id", "2", "--qw", "3", "--qa", "3"])
    other = last_json(lines)
    assert code == 0 and other["seed"] == 3 and other["qw"] == 3
    assert other["pool"] == summary["pool"]
    err = capsys.readouterr().err
    assert "16 images read from" in err and "synthesising" not in err


# ------------------------------------------------------------------------------------------------- bad input
def one_error_line(capsys, save_path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not save_path.exists() or not os.listdir(save_path)  # no run directory
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.fixture
def pool_folder(tmp_path, cifar_folder):
    """The folder of the pool that ``pool_args`` runs read, synthesised by a run."""
    code, lines = run_main(pool_args(tmp_path / "first", cifar_folder, f"pool_cache={tmp_path / 'pools'}"))
    assert code == 0
    return last_json(lines)["pool"]["folder"]


def test_a_damaged_pool_is_one_error_line(tmp_path, cifar_folder, pool_folder, capsys):
    path = os.path.join(pool_folder, "batch-00001.pt")
    with open(path, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    code, lines = run_main(pool_args(tmp_path / "runs", cifar_folder, f"pool_cache={tmp_path / 'pools'}"))
    assert code == 2 and lines == []
    line = one_error_line(capsys, tmp_path / "runs")
    assert f"the pool in {pool_folder} is damaged (batch-00001.pt: cannot be read: " in line
    assert line.endswith("delete that folder to synthesise the pool again, or set pool_cache to another folder")


def test_a_pool_of_another_teacher_is_one_error_line(tmp_path, cifar_folder, pool_folder, capsys):
    capsys.readouterr()
    code, lines = run_main(pool_args(tmp_path / "runs", cifar_folder, f"pool_cache={pool_folder}")
                           + ["--id", "2"])  # another seed: another random teacher
    assert code == 2 and lines == []
    assert f"pool_cache: {pool_folder} holds a pool built for another teacher" in one_error_line(capsys,
                                                                                               tmp_path / "runs")


def test_a_full_disk_while_synthesising_is_one_error_line(tmp_path, cifar_folder, full_disk, monkeypatch,  # noqa: F811
                                                          capsys):
    real = files.atomic_write_bytes

    def filling_up(data, path):
        full_disk["room"] = 10 if path.endswith("batch-00001.pt") else 10 ** 9
        return real(data, path)

    monkeypatch.setattr(files, "atomic_write_bytes", filling_up)
    code, lines = run_main(pool_args(tmp_path / "runs", cifar_folder, f"pool_cache={tmp_path / 'pools'}"))
    assert code == 2 and lines == []
    line = one_error_line(capsys, tmp_path / "runs")
    assert "batch-00001.pt: the disk is full (" in line and line.endswith("run again to resume its synthesis")
    (folder,) = [f for f in (tmp_path / "pools").iterdir() if f.is_dir()]
    assert sorted(os.listdir(folder)) == ["batch-00000.pt", "manifest.json"]  # no partial file


def test_resuming_with_the_other_image_source_is_one_error_line(tmp_path, cifar_folder, capsys):
    run_dir = last_json(run_main(tiny_run_args(tmp_path / "runs", cifar_folder))[1])["run_dir"]
    capsys.readouterr()
    code, lines = run_main(["--resume", run_dir, "--force", *[part for s in POOL for part in ("--set", s)]])
    assert code == 2 and lines == []
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("error: the checkpoint holds student, generator, opt_S, opt_G and this run trains student, opt_S: "
                    "resume it with the image_source that wrote it")


# ------------------------------------------------------------------------------------------ tools/synthesize
def test_synthesize_builds_the_pool_that_runs_then_read(tmp_path, cifar_folder, teacher_file, capsys):
    sets = [part for s in (*POOL, f"pool_cache={tmp_path / 'pools'}", f"teacher_weights={teacher_file}")
            for part in ("--set", s)]
    assert synthesize_main(["--conf_path", CIFAR10_CONF, *sets]) == 0
    built = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert built["images"] == 16 and os.path.isdir(built["folder"]) and built["final_bns"] < built["initial_bns"]
    code, lines = run_main(pool_args(tmp_path / "runs", cifar_folder, f"pool_cache={tmp_path / 'pools'}",
                                     f"teacher_weights={teacher_file}"))
    assert code == 0 and last_json(lines)["pool"]["key"] == built["key"]
    assert "synthesising" not in capsys.readouterr().err
    assert synthesize_main(["--conf_path", CIFAR10_CONF, *sets, "--set", "pool_patience=-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: pool_patience = -1 must be at least 0"


@needs_shared_data
def test_synthesis_on_the_shared_teacher_makes_images_of_their_labels(tmp_path):
    options = load_options(CIFAR10A_CONF, ["image_source=pool", "pool_size=32", "pool_batch=32", "pool_iters=40"])
    teacher, source = build_teacher(options.network, RESNET20A_WEIGHTS)
    pool = load_pool(check_pool_options(options), teacher, str(tmp_path), torch.device("cpu"), source)
    summary = pool.summary
    assert summary["final_bns"] < 0.1 * summary["initial_bns"]
    assert summary["teacher_acc"] >= 0.9  # the teacher assigns (nearly) every image to its label
    assert len(set(pool.labels.tolist())) >= 8
