"""Losses: the generator's (``generator``), the student's registered terms (``kd``, ``gdfq``, ``akt``, ``synq``,
``plf``), the input filters, and the non-finite check. ``student_losses`` and ``student_input_filter`` name entries
of the registries in ``registry``; docs/design.md tells how to add one."""

from . import akt, gdfq, kd, plf, synq  # noqa: F401  (each module registers its terms and filters)
from .finite import TOTAL_LOSSES, NonFiniteLossError, check_finite
from .generator import GENERATOR_LOSSES, BNStatistics, entropy, generator_loss, marginal_loss, onehot_loss
from .kd import kd_loss
from .registry import (
    INPUT_FILTERS,
    STUDENT_LOSSES,
    FeatureCapture,
    MissingLayersError,
    StudentBatch,
    StudentLoss,
    build_student_losses,
    input_filter_names,
    make_input_filter,
    register_input_filter,
    register_student_loss,
    student_loss,
    student_loss_names,
)

__all__ = ["BNStatistics", "FeatureCapture", "GENERATOR_LOSSES", "INPUT_FILTERS", "MissingLayersError",
           "NonFiniteLossError", "STUDENT_LOSSES", "StudentBatch", "StudentLoss", "TOTAL_LOSSES",
           "build_student_losses", "check_finite", "entropy", "generator_loss", "input_filter_names", "kd_loss",
           "make_input_filter", "marginal_loss", "onehot_loss", "register_input_filter", "register_student_loss",
           "student_loss", "student_loss_names"]
