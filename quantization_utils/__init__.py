"""Fake quantization for zero-shot QAT: GranQ's per-(sample, channel) activation quantizer and baselines."""

from .act_quantizers import ACT_QUANTIZERS, ActQuantizer, act_quantizer_names, register_act_quantizer
from .functional import (
    StraightThrough,
    channel_fake_quant,
    channel_loop_fake_quant,
    check_bits,
    fake_quantize,
    granq_fake_quant,
    layerwise_fake_quant,
    quant_params,
    weight_fake_quant,
)
from .fused import QUANT_IMPLS, CompiledGranQ, granq_function, quant_path, weight_function
from .modules import ActQuant, QuantAct, QuantConv2d, QuantLinear, WeightQuant
from .quantize import (
    ACT_TYPES,
    DEFAULT_ACT_TYPES,
    StudentSpec,
    activation_classes,
    count_modules,
    has_tracked_ranges,
    quantize_model,
    rebuild_student,
    set_act_tracking,
    shared_act_quantizers,
    unquantized_inputs,
)
from .registry import Registry, UnknownNameError

__all__ = [
    "ACT_QUANTIZERS",
    "ACT_TYPES",
    "ActQuant",
    "ActQuantizer",
    "CompiledGranQ",
    "DEFAULT_ACT_TYPES",
    "QUANT_IMPLS",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "Registry",
    "StraightThrough",
    "StudentSpec",
    "UnknownNameError",
    "WeightQuant",
    "act_quantizer_names",
    "activation_classes",
    "channel_fake_quant",
    "channel_loop_fake_quant",
    "check_bits",
    "count_modules",
    "fake_quantize",
    "granq_fake_quant",
    "granq_function",
    "has_tracked_ranges",
    "layerwise_fake_quant",
    "quant_params",
    "quant_path",
    "quantize_model",
    "rebuild_student",
    "register_act_quantizer",
    "set_act_tracking",
    "shared_act_quantizers",
    "unquantized_inputs",
    "weight_fake_quant",
    "weight_function",
]
