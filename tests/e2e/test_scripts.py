import os
import subprocess

import pytest

from ..conftest import ROOT

SCRIPTS = ["run_3bit.sh", "run_3bit_cifar100.sh"] + [
    f"CIFAR/run_{bits}bit{suffix}.sh" for bits in (3, 4, 5) for suffix in ("", "_cifar100")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_scripts_pass_arguments_on(script, tmp_path):
    # An unknown key proves the arguments reach main.py after the script's config loaded.
    result = subprocess.run(["bash", os.path.join(ROOT, script), "--set", "no_such_key=1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unknown config key(s): no_such_key" in result.stderr
    assert result.stdout == ""
