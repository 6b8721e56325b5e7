"""Faults found by trying: a full disk under the run directory, an unreadable image in the test set. Each ends
the run with one ``error:`` line, no traceback and no partial file."""

import contextlib
import glob
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT, make_image_folder, run_main, tiny_run_args
from ..unit.test_files import full_disk  # noqa: F401 F811  (a fixture)


@contextlib.contextmanager
def small_tmpfs(folder, size: int = 1_500_000):
    """A tmpfs of ``size`` bytes mounted on ``folder`` (root only; the test skips where it cannot be mounted)."""
    os.makedirs(folder, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_full_tmpfs_ends_the_run_with_one_error_line(tmp_path, cifar_folder):
    # The run directory on 1.5 MB, the evaluation cache (60 kB for these 20 images) on 16 kB.
    with small_tmpfs(tmp_path / "disk") as disk, small_tmpfs(tmp_path / "cache", 16_384) as cache:
        args = tiny_run_args(disk, cifar_folder, "--set", f"eval_cache={cache}")
        result = subprocess.run([sys.executable, os.path.join(ROOT, "CIFAR", "main.py"), *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        leftovers = [path for folder in (disk, cache) for path in glob.glob(os.path.join(folder, "**", "*.tmp"),
                                                                             recursive=True)]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    (error,) = error_lines(result.stderr)
    assert "checkpoint.pt: the disk is full (" in error and "bytes needed, " in error and " free)" in error
    assert "no checkpoint.pt was written before" in error
    # The evaluation cache did not fit either: it fell back to decoding, with a warning.
    assert "eval cache: cannot write the decoded test set" in result.stderr
    assert leftovers == []


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_and_says_how_to_resume(tmp_path, cifar_folder,
                                                                                      full_disk, capsys):  # noqa: F811
    # Room for everything in epoch 1; epoch 2's checkpoint then finds the disk full.
    full_disk["room"] = 10 ** 12
    writes = []
    from utils.system import files

    real = files.atomic_write_bytes

    def count(data, path):
        writes.append(os.path.basename(path))
        if writes.count("checkpoint.pt") == 2:
            full_disk["room"] = 1000
        real(data, path)

    files_patch = pytest.MonkeyPatch()
    files_patch.setattr(files, "atomic_write_bytes", count)
    try:
        code, lines = run_main(tiny_run_args(tmp_path, cifar_folder, "--set", "nEpochs=2"))
    finally:
        files_patch.undo()
    err = capsys.readouterr().err
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*"))
    assert code == 2 and lines == []
    assert "Traceback" not in err
    (error,) = error_lines(err)
    assert error.startswith(f"error: cannot write {os.path.join(run_dir, 'checkpoint.pt')}: the disk is full (")
    assert error.endswith(f"the previous checkpoint.pt is intact; free some space, then resume with: python "
                          f"{sys.argv[0]} --resume {run_dir}")
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))
    # The checkpoint of epoch 1 resumes the run once there is room again.
    full_disk["room"] = 10 ** 12
    code, lines = run_main(["--resume", run_dir])
    assert code == 0 and '"epochs": 2' in lines[-1]


def corrupt_copy(folder, root) -> str:
    """``folder`` (an ImageFolder) copied to ``root`` with its first image replaced by bytes that are no image."""
    import shutil

    shutil.copytree(folder, root)
    victim = sorted(glob.glob(os.path.join(root, "*", "*")))[0]
    with open(victim, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a JPEG after all")
    return victim


@pytest.mark.parametrize("cache, workers", [("auto", 0), ("auto", 2), ("off", 0), ("off", 2)])
def test_a_corrupt_test_image_is_one_error_line_naming_it(tmp_path, cache, workers, capfd):
    folder = make_image_folder(tmp_path / "clean", classes=10, per_class=2, size=32)
    victim = corrupt_copy(folder, str(tmp_path / "corrupt"))
    args = tiny_run_args(tmp_path / "runs", tmp_path / "corrupt", "--set", f"eval_cache={cache}",
                         "--set", f"nThreads={workers}")
    code, lines = run_main(args)
    err = capfd.readouterr().err  # the workers' output too
    assert code == 2 and lines == []
    assert "Traceback" not in err, err
    (error,) = error_lines(err)
    assert error.startswith(f"error: test image {victim} cannot be read (")
    if cache == "auto":  # the cache decodes every image anyway, so it counts them
        assert "1 of the 20 images in " in error
