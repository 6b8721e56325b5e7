"""Every bad input: exit code 2, one line that names the problem, no traceback, no run directory."""

import os

import pytest
import torch

from utils.models import get_model_spec

from ..conftest import CIFAR10A_CONF, last_json, run_main, tiny_run_args


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    foreign = tmp_path / "foreign.pth"
    torch.save(get_model_spec("resnet20a_cifar10").build().state_dict(), foreign)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return {"corrupt": corrupt, "foreign": foreign, "blocker": blocker, "missing": tmp_path / "missing.pth"}


CASES = {
    "unknown key": (["--set", "bachSize=3"], "unknown config key(s): bachSize. Valid keys:"),
    "wrong type": (["--set", "batchSize=sixteen"], "batchSize must be an integer, got 'sixteen' (str)"),
    "weight bits": (["--qw", "9"], "qw = 9 is out of range: bit-widths from 2 to 8"),
    "activation bits": (["--qa", "1"], "qa = 1 is out of range"),
    "classes": (["--set", "nClasses=1000"], "nClasses = 1000 disagrees with network 'resnet20_cifar10'"),
    "empty dataPath": (["--set", "dataPath="], "dataPath is empty"),
    "missing weights": (["--set", "teacher_weights={missing}"], "teacher_weights file '{missing}' does not exist"),
    "corrupt weights": (["--set", "teacher_weights={corrupt}"], "cannot be read as a PyTorch checkpoint"),
    "foreign weights": (["--set", "teacher_weights={foreign}"], "does not fit network 'resnet20_cifar10'"),
    "unwritable save_path": (["--set", "save_path={blocker}/runs"], "is not writable"),
    "unknown network": (["--set", "network=resnet21"], "network = 'resnet21' is unknown. Give a pytorchcv "
                        "classification model (e.g. resnet20_cifar10"),
    "no BatchNorm": (["--set", "network=tests.e2e.user_models:tiny_net_without_batchnorm"],
                     "has no BatchNorm layer: the BN-statistics loss of the generator needs"),
    "activation type": (["--set", "act_types=[swish]"], "'swish' is not valid; choose from: relu, relu6, hardswish"),
    "user model without weights": (["--set", "network=tests.e2e.user_models:tiny_net", "--set", "teacher_weights="],
                                   "has no published weights: set teacher_weights to its weights file"),
    "cuda_graph value": (["--set", "cuda_graph=yes"], "cuda_graph = 'yes' is not valid; choose one of: auto, on, off"),
    "generator option in a pool run": (["--set", "image_source=pool", "--set", "lr_G=0.01"],
                                       "image_source = pool trains no generator, so lr_G = 0.01 (default 0.001) would "
                                       "have no effect"),
    "teacher outputs": (["--set", "network=tests.e2e.user_models:tiny_net", "--set", "nClasses=100"],
                        "returns (1, 10) for one 32x32 image where nClasses = 100"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_clear_line(case, tmp_path, cifar_folder, bad_files, capsys):
    extra, message = CASES[case]
    extra = [e.format(**bad_files) for e in extra]
    message = message.format(**bad_files)
    save_path = tmp_path / "runs"
    code, lines = run_main(tiny_run_args(save_path, cifar_folder, *extra))
    err = capsys.readouterr().err
    assert code == 2 and lines == []
    assert message in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err
    assert not save_path.exists() or not os.listdir(save_path)


def test_missing_cifar_data_offline(tmp_path, monkeypatch, capsys):
    from torchvision import datasets

    monkeypatch.setattr(datasets.CIFAR10, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    code, _ = run_main(tiny_run_args(tmp_path / "runs", tmp_path / "nowhere"))
    assert code == 2
    assert "could not be downloaded into it (offline)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path, cifar_folder, capsys):
    code, _ = run_main(tiny_run_args(tmp_path, cifar_folder, "--set", "batchSize=x", "--debug"))
    assert code == 2 and "Traceback" in capsys.readouterr().err


def test_checkpoint_of_another_model(tmp_path, cifar_folder, capsys):
    run_dir = last_json(run_main(tiny_run_args(tmp_path, cifar_folder))[1])["run_dir"]
    other = tiny_run_args(tmp_path, cifar_folder, conf=CIFAR10A_CONF)
    code, _ = run_main(["--resume", run_dir, "--force", *other])
    assert code == 2
    assert "the checkpoint does not fit network 'resnet20a_cifar10'" in capsys.readouterr().err


def test_resume_of_a_directory_without_checkpoint(tmp_path, capsys):
    code, _ = run_main(["--resume", str(tmp_path)])
    assert code == 2 and "holds no checkpoint.pt" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine cuda_graph = on is granted")
def test_cuda_graph_on_without_cuda_is_one_error_line(tmp_path, cifar_folder, capsys):
    save_path = tmp_path / "runs"
    code, lines = run_main(tiny_run_args(save_path, cifar_folder, "--set", "cuda_graph=on"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == []
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert err[-1].startswith("error: cuda_graph = on needs CUDA") and "cuda_graph = auto" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not save_path.exists() or not os.listdir(save_path)
