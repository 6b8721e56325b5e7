import errno
import json
import os

import pytest
import torch

from utils.system import files
from utils.system.files import WriteError, atomic_save, atomic_save_json
from utils.training.checkpoints import save_run_file


@pytest.fixture
def full_disk(monkeypatch):
    """Writes to files opened by utils.system.files fail as on a full disk after ``room`` bytes."""
    state = {"room": 10}
    real_open = open

    class FullFile:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def write(self, data):
            data = bytes(data)
            self.file.write(data[:state["room"]])
            if len(data) > state["room"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files, "open", FullFile, raising=False)
    return state


def test_atomic_save_replaces_the_file_in_one_step(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"epoch": 1}, path)
    atomic_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=False) == {"epoch": 2}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("write, read", [(atomic_save, lambda p: torch.load(p, weights_only=False)),
                                         (atomic_save_json, lambda p: json.load(open(p)))])
def test_a_full_disk_leaves_the_old_file_and_no_partial_one(tmp_path, full_disk, write, read):
    path = str(tmp_path / "file")
    full_disk["room"] = 10 ** 9
    write({"epoch": 1}, path)
    full_disk["room"] = 10
    with pytest.raises(WriteError) as raised:
        write({"epoch": 2, "pad": "x" * 1000}, path)
    assert read(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["file"]  # no file.tmp
    error = raised.value
    assert str(error).startswith(f"cannot write {path}: the disk is full (")
    assert error.needed > 1000 and f"{error.needed:,} bytes needed" in str(error)
    assert error.free is not None and f"{error.free:,} free" in str(error)


def test_other_os_errors_are_named(tmp_path):
    missing = str(tmp_path / "no-such-folder" / "summary.json")
    with pytest.raises(WriteError, match=r"cannot write .*summary.json: No such file or directory \("):
        atomic_save_json({}, missing)


def test_a_run_file_that_cannot_be_written_says_what_is_intact_and_how_to_resume(tmp_path, full_disk):
    run_dir = str(tmp_path)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    full_disk["room"] = 10
    with pytest.raises(WriteError, match="no checkpoint.pt was written before; free some space and start the run "
                                         "again$"):
        save_run_file({"epoch": 1}, checkpoint, run_dir)
    full_disk["room"] = 10 ** 9
    save_run_file({"epoch": 1}, checkpoint, run_dir)
    full_disk["room"] = 10
    with pytest.raises(WriteError, match=r"the previous checkpoint.pt is intact; free some space, then resume with: "
                                         rf"python \S+ --resume {run_dir}$"):
        save_run_file({"epoch": 2}, checkpoint, run_dir)
    assert torch.load(checkpoint, weights_only=False) == {"epoch": 1}
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt"]
