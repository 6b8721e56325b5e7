"""Figures on the real data in ../shared/data that the quantizers and teachers must keep."""

import pytest

from ..conftest import CIFAR10_CONF, PYTORCHCV_JPEG_WEIGHTS, needs_shared_data, post_training_args

pytestmark = needs_shared_data


def test_granq_beats_layerwise_after_quantization_by_three_points(shared_run):
    granq = shared_run("A4granq", post_training_args(4, 4, "granq"))
    layerwise = shared_run("A4layerwise", post_training_args(4, 4, "layerwise"))  # also the export tests'
    assert granq["teacher_top1"] == pytest.approx(81.03, abs=0.1)
    assert granq["student_top1"] >= layerwise["student_top1"] + 3


def test_pytorchcv_architecture_teacher_scores_as_its_readme_says(shared_run):
    summary = shared_run("P4granq", post_training_args(4, 4, "granq", CIFAR10_CONF, PYTORCHCV_JPEG_WEIGHTS))
    assert summary["teacher_top1"] == pytest.approx(85.38, abs=0.05)
