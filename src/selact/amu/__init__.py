"""The activation management unit: decides which inputs of a layer are multiplied.

:func:`mask` maps (activations, weight, config) to a bool mask that broadcasts to the
activations, or ``None`` when everything is kept. It never multiplies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from selact.amu.budget import (
    BudgetResult,
    apply_densities,
    budget_search,
    read_densities,
    uniform_search,
)
from selact.amu.calibration import ScoreSample
from selact.amu.norms import conv2d_input_norms, linear_input_norms
from selact.amu.select import keep_count, pool, threshold_keep, topk_keep
from selact.amu.strategies import STRATEGIES, Strategy, register_strategy
from selact.config import SelectiveConfig

__all__ = [
    "STRATEGIES",
    "BudgetResult",
    "apply_densities",
    "read_densities",
    "budget_search",
    "uniform_search",
    "ScoreSample",
    "Strategy",
    "conv2d_input_norms",
    "input_norms",
    "keep_count",
    "linear_input_norms",
    "mask",
    "pool",
    "register_strategy",
    "threshold_keep",
    "topk_keep",
]


def input_norms(weight: torch.Tensor, layout: str, groups: int = 1) -> torch.Tensor:
    """Per-input weight norms, shaped to broadcast against the layout's input."""
    if layout == "linear":
        return linear_input_norms(weight)
    if layout == "conv":
        return conv2d_input_norms(weight, groups)
    raise ValueError(f"unknown layout {layout!r}; known: linear, conv")


def mask(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    config: SelectiveConfig,
    *,
    layout: str,
    groups: int = 1,
    threshold: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
    observe: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """The input mask of one layer call.

    Args:
        x: the layer's input: (..., K) for ``layout="linear"``, (B, C, H, W) for ``"conv"``.
        weight: the layer's weight, used by strategies that score with weight norms (SAPW).
        config: strategy, density, granularity, budget and block size.
        threshold: the calibrated threshold, required when ``config.budget == "threshold"``.
        norms: precomputed :func:`input_norms` (a layer caches them); computed when ``None``.
        observe: if given, receives the pooled scores (U, n); with no threshold yet the mask is
            then top-k. This is how calibration samples the scores a layer sees.
    """
    strategy = STRATEGIES[config.strategy]
    if not strategy.uses_budget:
        return strategy.fixed_mask(x)
    if config.density >= 1.0 and observe is None:
        return None
    if strategy.uses_weight and norms is None:
        if weight is None:
            raise ValueError(f"strategy {config.strategy!r} needs the layer's weight")
        norms = input_norms(weight, layout, groups)
    scores = strategy.scores(x.detach(), norms)
    pooled = pool(scores, layout, config.granularity, config.block)
    if observe is not None:
        observe(pooled.scores)
    if config.budget == "threshold" and threshold is not None:
        keep = threshold_keep(pooled.scores, threshold)
    elif config.budget == "threshold" and observe is None:
        raise ValueError("budget='threshold' needs a calibrated threshold")
    else:
        keep = topk_keep(pooled.scores, config.density)
    return pooled.expand(keep)
