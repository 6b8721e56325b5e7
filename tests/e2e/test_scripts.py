import os
import subprocess

import pytest

from ..conftest import ROOT


@pytest.mark.parametrize("script", ["run_3bit.sh", "ImageNet/run_4bit_res18.sh"])
def test_run_scripts_reach_main(script, tmp_path):
    # An unknown key proves the arguments reach main.py after the script's config loaded.
    result = subprocess.run(["bash", os.path.join(ROOT, script), "--set", "no_such_key=1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unknown config key(s): no_such_key" in result.stderr
    assert result.stdout == ""
