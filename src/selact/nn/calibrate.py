"""Fit each selective layer's threshold so its mean density on calibration data is its target."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from selact import amu
from selact.amu.calibration import MAX_SAMPLES
from selact.nn.base import SelectiveModule
from selact.nn.stats import reset

log = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], *, passes: int = 3, max_samples: int = MAX_SAMPLES
) -> nn.Module:
    """Run ``batches`` through ``model`` (in eval mode) and fit every layer's ``threshold``.

    Each item of ``batches`` is one model input: a tensor is passed as ``model(item)``, a tuple or
    list as ``model(*item)``, a dict as ``model(**item)``. Only layers with ``budget="threshold"``
    use the fitted thresholds; statistics are reset afterwards.

    A layer's scores depend on the masks of the layers before it. The first pass runs every layer
    with top-k masks; each later pass runs with the thresholds of the pass before and refits them,
    so after ``passes`` passes the first ``passes`` layers of any chain are fitted on exactly the
    inputs they get at run time, and deeper layers on nearly those.
    """
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    layers = [m for m in model.modules() if isinstance(m, SelectiveModule)]
    if not layers:
        raise ValueError("the model has no selective layers: call selact.sparsify first")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: batches is empty")
    fitted = [
        layer
        for layer in layers
        if layer.config.budget == "threshold" and amu.STRATEGIES[layer.config.strategy].uses_budget
    ]
    for layer in layers:
        layer.threshold.fill_(float("nan"))
        layer._threshold_checked = False
    was_training = model.training
    model.eval()
    try:
        for _ in range(passes if fitted else 1):
            for layer in layers:
                layer.score_sample = amu.ScoreSample(max_samples)
            for item in batches:
                _run(model, item)
            for layer in layers:
                if layer.score_sample.count:
                    layer.threshold.fill_(layer.score_sample.threshold(layer.config.density).item())
        silent = [layer.layer_name for layer in fitted if not layer.score_sample.count]
        if silent:
            log.warning("calibrate: these layers did not run and have no threshold: %s", silent)
    finally:
        for layer in layers:
            layer.score_sample = None
        model.train(was_training)
    reset(model)
    return model


def _run(model: nn.Module, item: Any) -> None:
    if isinstance(item, dict):
        model(**item)
    elif isinstance(item, tuple | list):
        model(*item)
    else:
        model(item)
