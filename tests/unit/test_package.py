import subprocess
import sys

from ..conftest import ROOT


def test_the_quantizer_package_stands_alone():
    # quantization_utils is the reusable core: importing it must not pull in the trainer side (utils) or plotting.
    code = ("import quantization_utils, sys; "
            "print(sorted(m for m in sys.modules if m == 'utils' or m.startswith(('utils.', 'matplotlib'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
