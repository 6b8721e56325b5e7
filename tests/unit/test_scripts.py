"""Every run script hands main.py exactly the config, bit-widths, seed id and extra arguments it names."""

import os
import subprocess

import pytest

from ..conftest import ROOT

CIFAR_CONFIGS = {"": "cifar10_resnet20", "_cifar100": "cifar100_resnet20"}
IMAGENET_CONFIGS = {"res18": "imagenet_res18", "res50": "imagenet_res50", "MV2": "imagenet_MV2"}

# script -> (folder of main.py and the config, config name, bits)
EXPECTED = {
    "run_3bit.sh": ("CIFAR", "cifar10_resnet20", 3),
    "run_3bit_cifar100.sh": ("CIFAR", "cifar100_resnet20", 3),
    **{f"CIFAR/run_{bits}bit{suffix}.sh": ("CIFAR", config, bits)
       for bits in (3, 4, 5) for suffix, config in CIFAR_CONFIGS.items()},
    **{f"ImageNet/run_{bits}bit_{name}.sh": ("ImageNet", config, bits)
       for bits in (3, 4, 5) for name, config in IMAGENET_CONFIGS.items()},
}


def test_every_run_script_is_covered():
    scripts = {os.path.relpath(os.path.join(folder, name), ROOT)
               for folder in (ROOT, os.path.join(ROOT, "CIFAR"), os.path.join(ROOT, "ImageNet"))
               for name in os.listdir(folder) if name.startswith("run_") and name.endswith(".sh")
               and not name.startswith("run_all_")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
@pytest.mark.parametrize("run_id", [None, "7"])
def test_run_script_passes_config_bits_and_arguments(script, run_id, tmp_path):
    folder, config, bits = EXPECTED[script]
    env = {**os.environ, "PYTHON": "echo"}
    env.pop("ID", None)
    if run_id:
        env["ID"] = run_id
    result = subprocess.run(["bash", os.path.join(ROOT, script), "--set", "nEpochs=1", "--set", "a b=c"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    here = os.path.join(ROOT, folder)
    assert result.stdout == (f"{here}/main.py --conf_path {here}/{config}.hocon --id {run_id or 1} "
                             f"--qw {bits} --qa {bits} --set nEpochs=1 --set a b=c\n")
