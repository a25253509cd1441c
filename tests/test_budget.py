"""Budgets: the greedy global search and the uniform search meet MAC targets, counted apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selact
from selact.amu import apply_densities, budget_search, uniform_search
from tests.mac_count import independent_fraction


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return net.eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_global_search_meets_targets(granularity):
    model = selact.sparsify(_net(), strategy="sapi", granularity=granularity, check_finite=False)
    batches = _batches()
    targets = [0.5, 0.3]
    results = budget_search(model, batches, targets, mac_step=0.04)
    assert [r.target for r in results] == targets
    for r in results:
        assert r.allocation == "global"
        assert r.executed_fraction <= r.target + 1e-9
        assert r.executed_fraction >= r.target - 0.1
        apply_densities(model, r.densities)
        assert independent_fraction(model, batches, _net()) == pytest.approx(
            r.executed_fraction, abs=1e-9
        )
    assert results[1].sensitivity >= results[0].sensitivity
    # the model's configs are restored (density 0.5 from sparsify's default)
    selact.densify(model)


def test_lazy_global_search_meets_targets_with_fewer_passes():
    """refresh > 1: lazy steps between full ones; the targets are met as by the plain search,
    with fewer passes over the calibration batches; refresh=1 is the plain search."""
    model = selact.sparsify(_net(), strategy="sapw", check_finite=False)
    batches, targets = _batches(), [0.5, 0.3, 0.2]
    plain = budget_search(model, batches, targets, mac_step=0.02)
    lazy = budget_search(model, batches, targets, mac_step=0.02, refresh=5)
    for p, q in zip(plain, lazy, strict=True):
        assert q.executed_fraction <= q.target + 1e-9
        apply_densities(model, q.densities)
        assert independent_fraction(model, batches, _net()) == pytest.approx(
            q.executed_fraction, abs=1e-9
        )
        assert q.sensitivity <= 2 * p.sensitivity + 1e-6
    assert lazy[-1].evaluations < plain[-1].evaluations
    assert budget_search(model, batches, targets, mac_step=0.02, refresh=1) == plain
    with pytest.raises(ValueError, match="refresh"):
        budget_search(model, batches, 0.5, refresh=0)


def test_uniform_search_and_overrides():
    model = selact.sparsify(_net(), strategy="sapw", check_finite=False)
    batches = _batches()
    greedy = budget_search(model, batches, 0.35, mac_step=0.04)[0]
    uniform = uniform_search(model, batches, 0.35)[0]
    assert len(set(uniform.densities.values())) == 1 and uniform.allocation == "uniform"
    assert 0.3 <= uniform.executed_fraction <= 0.35 + 1e-9
    apply_densities(model, uniform.densities)
    assert independent_fraction(model, batches, _net()) == pytest.approx(uniform.executed_fraction)
    sparse = selact.sparsify(_net(), strategy="sapw", overrides=greedy.overrides())
    assert independent_fraction(sparse, batches, _net()) == pytest.approx(greedy.executed_fraction)


def test_uniform_at_full_budget_is_dense_and_errors_are_clear():
    model = selact.sparsify(_net(), strategy="sapi")
    result = uniform_search(model, _batches(), 1.0)[0]
    assert set(result.densities.values()) == {1.0} and result.sensitivity == 0.0
    with pytest.raises(ValueError, match="no selective layers named"):
        apply_densities(model, {"nope": 0.5})
    with pytest.raises(ValueError, match="sparsify first"):
        budget_search(_net(), _batches(), 0.5)
    with pytest.raises(ValueError, match="fractions"):
        budget_search(model, _batches(), 1.5)


def test_searches_stop_at_their_deadline():
    import time

    model = selact.sparsify(_net(), strategy="sapi", check_finite=False)
    past = time.monotonic() - 1.0
    (late,) = budget_search(model, _batches(), [0.2], deadline=past)
    assert late.executed_fraction > 0.2  # reported, not met: callers check before using it
    assert uniform_search(model, _batches(), [0.2], deadline=past) == []
