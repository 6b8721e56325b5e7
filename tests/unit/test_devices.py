"""Device selection and backend flags, on any machine: CUDA's presence is faked, no CUDA function runs."""

import os

import pytest
import torch

import utils.system.distributed as distributed
from utils.system.devices import (
    CUBLAS_WORKSPACE,
    MIN_TORCH,
    backend_flags,
    check_torch,
    configure_backends,
    cuda_device,
    set_tf32_settings,
    tf32_settings,
)
from utils.system.errors import UserError

CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend ``count`` GPUs are visible; record the devices made current instead of touching CUDA."""
    current = []

    def install(count: int) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", current.append)
        return current

    return install


def test_a_visible_gpu_becomes_the_current_device(fake_gpus):
    current = fake_gpus(2)
    assert cuda_device(1, "GPU") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]


@pytest.mark.parametrize("index", [2, 5, -1])
def test_a_gpu_index_that_is_not_there_is_an_error(fake_gpus, index, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    current = fake_gpus(2)
    with pytest.raises(UserError, match=rf"^GPU = {index} but 2 GPU\(s\) are visible \(CUDA_VISIBLE_DEVICES=3,4\); "
                                        r"set GPU to one of 0..1"):
        cuda_device(index, "GPU")
    assert current == []


def test_single_process_uses_the_gpu_key(fake_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "7")  # ignored without torchrun
    fake_gpus(4)
    assert distributed.init_from_env(3) == torch.device("cuda", 3)
    with pytest.raises(UserError, match=r"GPU = 4 but 4 GPU\(s\) are visible"):
        distributed.init_from_env(4)


def test_a_local_rank_without_its_gpu_is_an_error(fake_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **k: pytest.fail("the process group must not start on a missing GPU"))
    current = fake_gpus(2)
    with pytest.raises(UserError, match=r"LOCAL_RANK = 2 but 2 GPU\(s\) are visible .*--nproc_per_node 2"):
        distributed.init_from_env(0)
    assert current == []


def test_without_cuda_the_gpu_key_is_ignored(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_from_env(5) == torch.device("cpu")


def test_deterministic_mode_sets_every_flag(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_tf32_settings({key: "tf32" if isinstance(value, str) else True  # as a user may set them
                       for key, value in tf32_settings().items()})
    torch.backends.cudnn.benchmark = True
    flags = configure_backends(True, CUDA)
    assert flags == {"deterministic": True, "cudnn_benchmark": False, "tf32": {"conv": False, "matmul": False}}
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert set(tf32_settings().values()) <= {"ieee", False}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_deterministic_mode_keeps_a_cublas_setting_given(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_backends(True, CUDA)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_default_mode_restores_speed_after_a_deterministic_run():
    configure_backends(True, CUDA)
    flags = configure_backends(False, CUDA)
    # torch's defaults: TF32 in cuDNN convolutions, not in matrix products
    assert flags == {"deterministic": False, "cudnn_benchmark": True, "tf32": {"conv": True, "matmul": False}}
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_the_cpu_reports_no_cudnn_and_no_tf32():
    configure_backends(False, CUDA)  # flags left on by a CUDA run in the same process
    assert backend_flags(torch.device("cpu")) == {"deterministic": False, "cudnn_benchmark": False,
                                                  "tf32": {"conv": False, "matmul": False}}
    assert configure_backends(True, torch.device("cpu"))["deterministic"] is True


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
def test_tf32_is_set_through_fp32_precision_without_warnings(recwarn):
    configure_backends(True, CUDA)
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("ieee", "ieee")
    flags = configure_backends(False, CUDA)
    assert torch.backends.cudnn.conv.fp32_precision == "tf32" and flags["tf32"]["conv"]
    assert [str(w.message) for w in recwarn] == []


def test_an_older_torch_is_named_with_the_release_it_needs():
    assert MIN_TORCH == (2, 6)
    for version in ("2.6.0", "2.6.0+cu124", "2.14.1", "2.10.0a0+git1234", "3.0.0"):
        check_torch(version)
    with pytest.raises(UserError, match=r"^this code needs torch 2\.6 or newer, and torch 2\.5\.1\+cpu is installed: "
                                        r"pip install 'torch>=2\.6'"):
        check_torch("2.5.1+cpu")


def test_a_run_with_an_older_torch_ends_in_one_error_line(tmp_path, monkeypatch, capsys):
    from tests.conftest import run_main, tiny_run_args

    monkeypatch.setattr(torch, "__version__", "2.3.0")
    code, lines = run_main(tiny_run_args(tmp_path / "runs", tmp_path / "data"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == []
    assert err == ["error: this code needs torch 2.6 or newer, and torch 2.3.0 is installed: pip install "
                   "'torch>=2.6' (or pip install -r requirements.txt)"]
    assert not (tmp_path / "runs").exists()
