"""selact: selective activation for PyTorch.

Only the inputs of a layer that matter are multiplied: the AMU (:mod:`selact.amu`) chooses them
(SAPI, SAPW), MGEMM (:mod:`selact.mgemm`) multiplies them and counts the work, and
:func:`sparsify` converts any model in one call.
"""

from selact.config import GRANULARITIES, SelectiveConfig
from selact.nn import (
    LayerStats,
    SelectiveConv2d,
    SelectiveLinear,
    SelectiveModule,
    SelectiveMultiheadAttention,
    Stats,
    calibrate,
    densify,
    load,
    reset_stats,
    save,
    sparsify,
    stats,
)

__version__ = "0.1.0"

__all__ = [
    "GRANULARITIES",
    "LayerStats",
    "SelectiveConfig",
    "SelectiveConv2d",
    "SelectiveLinear",
    "SelectiveModule",
    "SelectiveMultiheadAttention",
    "Stats",
    "calibrate",
    "densify",
    "load",
    "reset_stats",
    "save",
    "sparsify",
    "stats",
]
