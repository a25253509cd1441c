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
        eager = selact.stats(model).total
        selact.reset_stats(model)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(compiled(torch.randn(1, 3, 8, 8) * 0 + x), expected)
    # The counters add tensors in the graph (Python ints in eager CPU code): the same counts.
    counted = selact.stats(model).total
    assert counted.calls == 2 * eager.calls
    assert counted.executed_macs == 2 * eager.executed_macs > 0
    assert counted.zero_skip_macs == 2 * eager.zero_skip_macs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "conv_granularity", "linear_granularity"),
    [
        ("sapi", "channel", "element"),
        ("sapw", "channel", "channel"),
        ("sapw", "element", "element"),
    ],
)
def test_fused_cpu_routes_compile_into_one_graph(strategy, conv_granularity, linear_granularity):
    """The CPU kernels' fused routes (top-k and product in one call) trace as torch ops: the
    whole selective model is one graph (``fullgraph=True`` raises on any break) and gives the
    eager outputs."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    torch._dynamo.reset()  # each case's models afresh: recompiles would add up to Dynamo's limit
    torch.manual_seed(0)
    dense = _model()
    linears = {n: {"granularity": linear_granularity} for n, m in dense.named_modules()
               if isinstance(m, nn.Linear)}  # fmt: skip
    model = selact.sparsify(
        dense, strategy=strategy, density=0.4, granularity=conv_granularity, overrides=linears,
        counting=False, check_finite=False,
    )  # fmt: skip
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        for batch in (1, 1, 3):  # the second call reuses the graph
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(compiled(x), model(x))


def test_cpu_kernels_are_custom_ops_with_matching_fake_implementations():
    """``torch.ops.selact_cpu.*``: schemas and fake implementations (what torch.compile traces)
    agree with the kernels on shapes, dtypes and memory formats."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 20), torch.randn(7, 20), torch.randn(7)
    mask = torch.rand(2, 1, 20) < 0.5  # a mask per sample, shared by its 3 rows
    image, kernel = torch.randn(2, 5, 6, 6), torch.randn(4, 5, 3, 3)
    geometry = cpu.conv_geometry(1, 1, 1)
    ops = torch.ops.selact_cpu
    checks = "test_schema", "test_faketensor"
    torch.library.opcheck(ops.sparse_linear, (x, mask, w, b, True), test_utils=checks)
    torch.library.opcheck(ops.select_linear, (x, 3, 4, None, w, b, True), test_utils=checks)
    conv_args = (image, None, 2, None, kernel, None, *geometry, True)
    torch.library.opcheck(ops.channel_conv, conv_args, test_utils=checks)
    positions = torch.rand(2, 1, 6, 6) < 0.5
    spatial_args = (image, positions, kernel, None, 2, 1, 1, 1, 1, 1, True)
    torch.library.opcheck(ops.spatial_conv, spatial_args, test_utils=checks)
    inputs = torch.rand(2, 5, 6, 6) < 0.5
    for memory_format in (torch.contiguous_format, torch.channels_last):
        operand = image.contiguous(memory_format=memory_format)
        for mask, k in ((None, 60), (inputs, 0)):
            element_args = (operand, mask, k, None, kernel, b[:4], *geometry, True)
            torch.library.opcheck(ops.element_conv, element_args, test_utils=checks)
