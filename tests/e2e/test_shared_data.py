"""Figures on the real data in ../shared/data that the quantizers and teachers must keep."""

import pytest

from ..conftest import (
    CIFAR10_CONF,
    CIFAR10_JPEG,
    CIFAR10A_CONF,
    PYTORCHCV_JPEG_WEIGHTS,
    RESNET20A_WEIGHTS,
    last_json,
    needs_shared_data,
    run_main,
)

pytestmark = needs_shared_data


def post_training(tmp_path, conf, weights, *sets):
    args = ["--conf_path", conf, "--id", "1", "--qw", "4", "--qa", "4", "--set", f"teacher_weights={weights}",
            "--set", f"dataPath={CIFAR10_JPEG}", "--set", "nEpochs=0", "--set", f"save_path={tmp_path}",
            "--set", "nThreads=2"]
    for s in sets:
        args += ["--set", s]
    code, lines = run_main(args)
    assert code == 0
    return last_json(lines)


def test_granq_beats_layerwise_after_quantization_by_three_points(tmp_path):
    granq = post_training(tmp_path, CIFAR10A_CONF, RESNET20A_WEIGHTS, "act_mode=granq")
    layerwise = post_training(tmp_path, CIFAR10A_CONF, RESNET20A_WEIGHTS, "act_mode=layerwise")
    assert granq["teacher_top1"] == pytest.approx(81.03, abs=0.1)
    assert granq["student_top1"] >= layerwise["student_top1"] + 3


def test_pytorchcv_architecture_teacher_scores_as_its_readme_says(tmp_path):
    summary = post_training(tmp_path, CIFAR10_CONF, PYTORCHCV_JPEG_WEIGHTS)
    assert summary["teacher_top1"] == pytest.approx(85.38, abs=0.05)
