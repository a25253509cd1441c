"""SelectiveConv2d's fused CPU route (channel top-k and convolution in one kernel call) against
the general route: the AMU's mask in plain PyTorch, then the reference backend."""

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
from selact.nn import SelectiveConv2d
from tests.models import assert_fused_routes_match_the_general_route

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels could not be built")


def _layer(conv: nn.Conv2d, **fields) -> SelectiveConv2d:
    config = selact.SelectiveConfig(granularity="channel", check_finite=False, **fields)
    layer = SelectiveConv2d(conv, config)
    layer.layer_name = "conv"
    return layer


def _input(shape, zero_channels: int, channels_last: bool, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(shape).relu()
    x[:, :zero_channels] = 0  # ReLU maps often have dead channels: scores tie at zero
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _assert_reference_output(conv: nn.Conv2d, x, mask, y, executed) -> None:
    """``y`` and its MACs are the reference backend's (float64) for ``x`` under ``mask``."""
    expected, expected_macs = mgemm.conv2d(
        x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
        conv.stride, conv.padding, conv.dilation, in_mask=mask, backend="reference",
    )  # fmt: skip
    tol = 1e-5 * math.sqrt(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)
    assert int(executed) == int(expected_macs)


#: A selective convolution layer and its input, as both fused routes' tests draw them.
LAYER_CASES = dict(
    c_out=st.integers(1, 70),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    density=st.floats(0.01, 0.99),
    strategy=st.sampled_from(["sapi", "sapw"]),
    bias=st.booleans(),
    channels_last=st.booleans(),
    zero_channels=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 9),  # 2 threads: samples side by side from 2 (even) or 8 up
    c_in=st.integers(1, 20),
    **LAYER_CASES,
)
def test_fused_route_keeps_a_top_k_and_multiplies_exactly(
    batch, c_in, c_out, size, kernel, stride, padding, dilation, density, strategy, bias,
    channels_last, zero_channels, seed,
):  # fmt: skip
    h, w = size
    if min(h, w) + 2 * padding - dilation * (kernel - 1) < 1:
        return  # no output position
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=bias)
    fused = _layer(conv, strategy=strategy, density=density)
    x = _input((batch, c_in, h, w), zero_channels, channels_last, seed)
    norms = amu.input_norms(conv.weight, "conv") if strategy == "sapw" else None
    k = amu.keep_count(density, c_in)
    with torch.inference_mode():
        assert fused._fused_route(x)
        y_layer = fused(x)
        geometry = cpu.conv_geometry(stride, padding, dilation)
        y, keep, executed = cpu.select_conv2d(
            x, conv.weight, conv.bias, geometry, keep=k,
            norms=None if norms is None else norms.reshape(-1),
        )  # fmt: skip
    assert torch.equal(y_layer, y)

    # the kept channels are a top-k of the AMU's scores
    scores = amu.pool(amu.STRATEGIES[strategy].scores(x, norms), "conv", "channel").scores
    keep = keep.reshape(batch, c_in)
    assert keep.sum(1).tolist() == [k] * batch
    for b in range(batch):
        kept, dropped = scores[b][keep[b]], scores[b][~keep[b]]
        if dropped.numel():
            assert kept.min() >= dropped.max() * (1 - 1e-5) - 1e-7
    # the output and MACs are the reference's for that mask
    mask = keep.reshape(batch, c_in, 1, 1)
    _assert_reference_output(conv, x, mask, y, executed)


def test_fused_route_matches_the_general_route_on_a_model():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    assert_fused_routes_match_the_general_route(
        model, torch.randn(2, 3, 32, 32), strategy="sapi", density=0.35, granularity="channel"
    )


def test_fused_route_only_where_it_serves(monkeypatch):
    conv = nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        assert _layer(conv, density=0.5)._fused_route(x)
        assert not _layer(conv, density=1.0)._fused_route(x)  # nothing to select
        assert not _layer(conv, density=0.5, backend="reference")._fused_route(x)
        assert not _layer(conv, density=0.5, strategy="random")._fused_route(x)
        assert not _layer(conv, density=0.5, budget="threshold")._fused_route(x)
        assert not _layer(conv, density=0.5)._fused_route(x.double())
        assert _layer(conv, density=0.5)._fused_route(x.expand(9, -1, -1, -1))  # any batch
        monkeypatch.setenv("SELACT_BACKEND", "reference")
        assert not _layer(conv, density=0.5)._fused_route(x)
    assert not _layer(conv, density=0.5)._fused_route(x)  # training: weights require grad


def test_fused_route_at_density_one_is_the_dense_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 7, 7)
    keep_all = _layer(conv, density=0.999)  # keeps ceil(0.999 · 6) = 6 channels, fused
    with torch.inference_mode():
        assert keep_all._fused_route(x)
        torch.testing.assert_close(keep_all(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5),
    c_in=st.integers(1, 40),
    **LAYER_CASES,
)
def test_fused_element_route_keeps_the_amus_top_k_and_multiplies_exactly(
    batch, c_in, c_out, size, kernel, stride, padding, dilation, density, strategy, bias,
    channels_last, zero_channels, seed,
):  # fmt: skip
    """Element granularity: the kernel's top-k of each sample's C·H·W inputs is the AMU's mask
    (ties, such as dead channels' zeros, to the lower index), and the output and MACs are the
    reference's for that mask."""
    h, w = size
    if min(h, w) + 2 * padding - dilation * (kernel - 1) < 1:
        return  # no output position
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=bias)
    config = selact.SelectiveConfig(
        granularity="element", check_finite=False, strategy=strategy, density=density
    )
    layer = SelectiveConv2d(conv, config)
    x = _input((batch, c_in, h, w), zero_channels, channels_last, seed)
    norms = amu.input_norms(conv.weight, "conv") if strategy == "sapw" else None
    with torch.inference_mode():
        assert layer._fused_route(x)
        y_layer = layer(x)
        y, keep, executed = cpu.select_element_conv2d(
            x, conv.weight, conv.bias, cpu.conv_geometry(stride, padding, dilation),
            keep=amu.keep_count(density, c_in * h * w),
            norms=None if norms is None else norms.reshape(-1),
        )  # fmt: skip
        mask = amu.mask(x, conv.weight, config, layout="conv", norms=norms)
    assert torch.equal(y_layer, y)
    assert torch.equal(keep, mask.expand_as(x))
    _assert_reference_output(conv, x, mask, y, executed)


@pytest.mark.parametrize("c_out", [16, 256])  # on AVX2, 256 outputs take the gather form
@pytest.mark.parametrize("shape", [(16, 32, 32), (64, 8, 8)])
@pytest.mark.parametrize(
    "case",
    ["random", "dead channels", "just above zero", "sample misleads", "coarse values", "all equal"],
)
def test_fused_element_top_k_of_large_maps(case, shape, c_out):
    """Maps of 2048 inputs or more: the kernel brackets the k-th score from a sample of n/8 (at
    most 1024, spread over the channels) and falls back to the full radix select where the
    sample misleads; ties (many exact zeros, equal scores) still go to the lower (c, h, w) index,
    as the AMU ranks them. Both forms of the product (scatter, gather) take the kernel's mask."""
    torch.manual_seed(0)
    c = shape[0]
    x = torch.randn(2, *shape).relu().contiguous(memory_format=torch.channels_last)
    k = amu.keep_count(1 / 3, x[0].numel())
    if case == "dead channels":  # fewer nonzero inputs than kept: ties at zero
        x[:, : c * 3 // 4] = 0
    elif case == "just above zero":  # k + 2 nonzero inputs: the k-th is the third smallest of them
        flat = x.permute(0, 2, 3, 1).reshape(2, -1)
        for sample in flat:
            zeros = torch.randperm(sample.numel())[: sample.numel() - k - 2]
            sample[:] = torch.rand(sample.numel()) + 1e-3
            sample[zeros] = 0
        x = flat.reshape(2, *shape[1:], c).permute(0, 3, 1, 2)
    elif case == "sample misleads":  # the sampled inputs far above the rest
        n = x[0].numel()
        samples = min(1024, n // 8)
        step = n // samples
        sampled = torch.arange(samples) * step + torch.arange(samples) % step  # channels-last
        x.permute(0, 2, 3, 1).view(2, -1)[:, sampled] = 100.0
    elif case == "coarse values":  # ties at a nonzero k-th score, inside the bracket
        x = (x * 2).round() / 2
    elif case == "all equal":
        x = torch.ones_like(x)
    conv = nn.Conv2d(c, c_out, 3, padding=1)
    config = selact.SelectiveConfig(granularity="element", density=1 / 3, check_finite=False)
    with torch.inference_mode():
        y, keep, executed = cpu.select_element_conv2d(
            x, conv.weight, conv.bias, (1, 1, 1, 1, 1, 1), keep=k
        )
        mask = amu.mask(x, conv.weight, config, layout="conv")
    assert torch.equal(keep, mask)
    assert keep.flatten(1).sum(1).tolist() == [k, k]
    torch.testing.assert_close(y, F.conv2d(x * mask, conv.weight, conv.bias, 1, 1))


def test_fused_element_route_matches_the_general_route_on_a_model():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    assert_fused_routes_match_the_general_route(
        model, torch.randn(2, 3, 32, 32), strategy="sapw", density=1 / 3, granularity="element"
    )
