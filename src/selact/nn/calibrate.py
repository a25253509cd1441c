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
    model: nn.Module, batches: Iterable[Any], *, max_samples: int = MAX_SAMPLES
) -> nn.Module:
    """Run ``batches`` through ``model`` (in eval mode) and fit every layer's ``threshold``.

    Each item of ``batches`` is one model input: a tensor is passed as ``model(item)``, a tuple or
    list as ``model(*item)``, a dict as ``model(**item)``. During calibration layers keep their
    top-k masks, so each layer sees inputs as it will at run time. Only layers with
    ``budget="threshold"`` use the fitted thresholds. Statistics are reset afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, SelectiveModule)]
    if not layers:
        raise ValueError("the model has no selective layers: call selact.sparsify first")
    for layer in layers:
        layer.score_sample = amu.ScoreSample(max_samples)
    was_training = model.training
    model.eval()
    try:
        count = 0
        for item in batches:
            if isinstance(item, dict):
                model(**item)
            elif isinstance(item, tuple | list):
                model(*item)
            else:
                model(item)
            count += 1
        if count == 0:
            raise ValueError("calibrate: batches is empty")
        silent = []
        for layer in layers:
            sample = layer.score_sample
            if sample.count == 0:
                if amu.STRATEGIES[layer.config.strategy].uses_budget:
                    silent.append(layer.layer_name)
                continue
            layer.threshold.fill_(sample.threshold(layer.config.density).item())
            layer._threshold_checked = False
        if silent:
            log.warning("calibrate: these layers did not run and keep no threshold: %s", silent)
    finally:
        for layer in layers:
            layer.score_sample = None
        model.train(was_training)
    reset(model)
    return model
