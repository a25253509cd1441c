"""Selective models under torch.inference_mode and torch.compile give the eager results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selact


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_inference_mode_matches_no_grad(granularity):
    model = selact.sparsify(_model(), density=0.5, granularity=granularity)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)
    assert selact.stats(model).total.calls == 2 * 5  # 5 counted layers, in both modes


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # Custom ops have fake implementations; data-dependent steps (gathers) break the graph.
    model = selact.sparsify(_model(), density=0.5, granularity="channel", check_finite=False)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(compiled(torch.randn(1, 3, 8, 8) * 0 + x), expected)
