"""Selective Linear and Conv2d: clear errors, cached SAPW norms, granularities on token inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import selact
from selact.nn import SelectiveConv2d, SelectiveLinear


def _linear(**fields):
    layer = SelectiveLinear(nn.Linear(6, 4), selact.SelectiveConfig(**fields))
    layer.layer_name = "blocks.0.fc"
    return layer


def _conv(**fields):
    layer = SelectiveConv2d(nn.Conv2d(4, 5, 3, padding=1), selact.SelectiveConfig(**fields))
    layer.layer_name = "features.3"
    return layer


@pytest.mark.parametrize(
    ("layer", "x", "error", "words"),
    [
        (_linear(), torch.randn(2, 5), ValueError, r"'blocks.0.fc'.*6 entries.*\(2, 5\)"),
        (_linear(), torch.randn(2, 6).half(), TypeError, r"'blocks.0.fc'.*dtype"),
        (_linear(), torch.ones(2, 6, dtype=torch.long), TypeError, r"'blocks.0.fc'.*floating"),
        (_conv(), torch.randn(2, 4, 5), ValueError, r"'features.3'.*3 or 4-D"),
        (_conv(), torch.randn(2, 3, 5, 5), ValueError, r"'features.3'.*4 entries in dim -3"),
        (_conv(), torch.full((1, 4, 3, 3), float("nan")), ValueError, r"'features.3'.*NaN"),
    ],
)
def test_bad_inputs_name_the_layer(layer, x, error, words):
    with pytest.raises(error, match=words):
        layer(x)


def test_unbatched_conv_input():
    layer = _conv(density=1.0)
    x = torch.randn(4, 6, 6)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


def test_sapw_norms_follow_weight_updates():
    layer = _linear(strategy="sapw", density=0.5)
    x = torch.ones(1, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 1, 1, 9, 9, 9]).expand(4, 6))
        assert torch.equal(
            layer.input_mask(x, layer.weight, "linear")[0], torch.tensor([0, 0, 0, 1, 1, 1]).bool()
        )
        layer.weight.copy_(torch.tensor([9.0, 9, 9, 1, 1, 1]).expand(4, 6))  # in place
        assert torch.equal(
            layer.input_mask(x, layer.weight, "linear")[0], torch.tensor([1, 1, 1, 0, 0, 0]).bool()
        )


@pytest.mark.parametrize(
    ("granularity", "density"),
    [("element", 0.5), ("block", 4 / 6), ("channel", 0.5), ("spatial", 0.6), ("batch_shared", 0.5)],
)
def test_token_inputs_density_per_granularity(granularity, density):
    layer = _linear(granularity=granularity, block=2, density=0.5)
    layer(torch.randn(3, 5, 6))
    # element/channel/batch-shared keep 3 of 6 features; block keeps ceil(0.5·3)=2 of 3 blocks
    # of 2; spatial keeps ceil(0.5·5)=3 of 5 tokens.
    assert selact.stats(nn.Sequential(layer)).total.density == pytest.approx(density)


def test_zero_skip_and_executed_counts_of_a_relu_input():
    layer = _linear(strategy="zero_skip")
    x = torch.tensor([[0.0, 1, 0, 2, 0, 3]])
    layer(x)
    s = selact.stats(nn.Sequential(layer)).total
    assert (s.dense_macs, s.zero_skip_macs, s.executed_macs) == (24, 12, 12)
    assert s.density == 0.5
