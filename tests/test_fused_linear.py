"""The fused CPU route of selective Linear layers (feature top-k and product in one kernel call)
against the general route: the AMU's mask in plain PyTorch, then the reference backend."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import selact
from selact import amu, mgemm
from selact.mgemm import cpu
from selact.models import create_model
from selact.nn import SelectiveLinear
from tests.models import assert_fused_routes_match_the_general_route

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels could not be built")


def _layer(linear: nn.Linear, **fields) -> SelectiveLinear:
    fields = {"granularity": "channel", "check_finite": False} | fields
    layer = SelectiveLinear(linear, selact.SelectiveConfig(**fields))
    layer.layer_name = "fc"
    return layer


@settings(max_examples=60, deadline=None)
@given(
    lead=st.sampled_from([(), (1,), (3,), (1, 5), (2, 4), (2, 2, 3), (11,), (3, 9), (9, 8)]),
    k=st.integers(1, 40),
    n=st.integers(1, 70),
    granularity=st.sampled_from(["element", "channel"]),
    density=st.floats(0.01, 0.99),
    strategy=st.sampled_from(["sapi", "sapw"]),
    bias=st.booleans(),
    zero_features=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_fused_route_keeps_a_top_k_and_multiplies_exactly(
    lead, k, n, granularity, density, strategy, bias, zero_features, seed
):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    layer = _layer(linear, strategy=strategy, density=density, granularity=granularity)
    x = torch.randn(*lead, k).relu()
    x[..., :zero_features] = 0  # dead features: scores tie at zero
    rows = x.numel() // k
    groups = rows if granularity == "element" else (x.shape[0] if x.dim() > 1 else 1)
    if not cpu.serves_runs(groups, rows):
        return  # the general route's case (test_fused_route_only_where_it_serves)
    norms = amu.input_norms(linear.weight, "linear") if strategy == "sapw" else None
    keep_count = amu.keep_count(density, k)
    with torch.inference_mode():
        assert layer._fused_linear_groups(x, linear.weight) == groups
        y_layer = layer(x)
        y, keep, executed = cpu.select_linear(
            x, linear.weight, linear.bias, groups=groups, keep=keep_count,
            norms=None if norms is None else norms.reshape(-1),
        )  # fmt: skip
    assert torch.equal(y_layer, y) and y.shape == (*lead, n)

    # the kept features are a top-k of the AMU's scores
    scores = amu.pool(amu.STRATEGIES[strategy].scores(x, norms), "linear", granularity)
    scores = scores.scores.reshape(groups, k)
    assert keep.sum(1).tolist() == [keep_count] * groups
    for g in range(groups):
        kept, dropped = scores[g][keep[g]], scores[g][~keep[g]]
        if dropped.numel():
            assert kept.min() >= dropped.max() * (1 - 1e-5) - 1e-7
    # the output and MACs are the reference's for that mask
    if granularity == "element" or x.dim() < 2:
        mask = keep.reshape(x.shape)
    else:
        mask = keep.reshape(x.shape[0], *([1] * (x.dim() - 2)), k)
    expected, expected_macs = mgemm.linear(
        x.double(), linear.weight.double(), None if bias is False else linear.bias.double(),
        in_mask=mask, backend="reference",
    )  # fmt: skip
    tol = 1e-5 * math.sqrt(k)
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    assert int(executed) == int(expected_macs)


@pytest.mark.parametrize(
    ("name", "granularity"), [("vit", "channel"), ("vgg16", "element"), ("vgg16", "channel")]
)
def test_fused_route_matches_the_general_route_on_a_model(name, granularity):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    settings_ = {"strategy": "sapw", "density": 0.35, "granularity": granularity}
    assert_fused_routes_match_the_general_route(model, torch.randn(2, 3, 32, 32), **settings_)


def test_fused_route_only_where_it_serves(monkeypatch):
    linear = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        assert _layer(linear, density=0.5)._fused_linear_groups(x, linear.weight) == 2
        assert _layer(linear, density=0.5)._fused_linear_groups(x[0], linear.weight) == 1
        assert _layer(linear, density=1.0)._fused_linear_groups(x, linear.weight) == 0
        for fields in (
            {"backend": "reference"},
            {"strategy": "random"},
            {"budget": "threshold"},
            {"granularity": "block"},
        ):
            layer = _layer(linear, density=0.5, **fields)
            assert layer._fused_linear_groups(x, linear.weight) == 0, fields
        layer = _layer(linear, density=0.5)
        assert layer._fused_linear_groups(x.double(), linear.weight) == 0
        tokens = torch.randn(9, 3, 8)  # 9 samples: each would re-read the weight
        assert layer._fused_linear_groups(tokens, linear.weight) == 0
        assert layer._fused_linear_groups(tokens[:8], linear.weight) == 8
        sequences = torch.randn(9, 8, 8)  # 9 samples of 8 tokens: enough work per weight read
        assert layer._fused_linear_groups(sequences, linear.weight) == 9
        per_row = _layer(linear, density=0.5, granularity="element")
        assert per_row._fused_linear_groups(tokens[:2], linear.weight) == 6  # rows, not samples
        assert per_row._fused_linear_groups(tokens[:3], linear.weight) == 9  # one masked GEMM
        monkeypatch.setenv("SELACT_BACKEND", "reference")
        assert layer._fused_linear_groups(x, linear.weight) == 0
    assert layer._fused_linear_groups(x, linear.weight) == 0  # training: weights require grad


def test_fused_route_at_density_one_is_the_dense_layer():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    keep_all = _layer(linear, density=0.999)  # keeps ceil(0.999 · 6) = 6 features, fused
    with torch.inference_mode():
        assert keep_all._fused_linear_groups(x, linear.weight) == 3
        torch.testing.assert_close(keep_all(x), F.linear(x, linear.weight, linear.bias))


def test_inputs_off_the_cpu_never_build_the_cpu_kernels(monkeypatch):
    """A GPU run must not spend half a minute compiling the CPU kernels it cannot use."""

    def refuse():
        raise AssertionError("the CPU kernels were asked for")

    monkeypatch.setattr(cpu, "available", refuse)
    linear = nn.Linear(8, 4)
    layer = _layer(linear, density=0.5)
    with torch.inference_mode():
        assert layer._fused_linear_groups(torch.randn(2, 8, device="meta"), linear.weight) == 0
