"""Selective layers, one-call conversion, calibration, statistics and checkpoints."""

from selact.nn import attention  # noqa: F401  (registers the attention converters)
from selact.nn.attention import SelectiveAttentionValues, SelectiveMultiheadAttention
from selact.nn.base import Converted, SelectiveModule
from selact.nn.calibrate import calibrate
from selact.nn.convert import (
    CONVERTERS,
    converter_for,
    default_filter,
    densify,
    register_converter,
    sparsify,
)
from selact.nn.io import load, save, selective_configs
from selact.nn.layers import SelectiveConv2d, SelectiveLinear
from selact.nn.stats import LayerStats, Stats
from selact.nn.stats import collect as stats
from selact.nn.stats import reset as reset_stats

__all__ = [
    "CONVERTERS",
    "Converted",
    "LayerStats",
    "SelectiveAttentionValues",
    "SelectiveConv2d",
    "SelectiveLinear",
    "SelectiveModule",
    "SelectiveMultiheadAttention",
    "Stats",
    "calibrate",
    "converter_for",
    "default_filter",
    "densify",
    "load",
    "register_converter",
    "reset_stats",
    "save",
    "selective_configs",
    "sparsify",
    "stats",
]
