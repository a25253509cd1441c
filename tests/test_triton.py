"""The Triton kernels against the reference, run by Triton's interpreter on the CPU where there is
no GPU (``TRITON_INTERPRET=1``, set in conftest.py). The interpreter is slow and gave wrong bf16
``tl.dot`` results (DESIGN.md section 5), so these cases are few, small, float32 and float16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selact import mgemm

pytestmark = pytest.mark.slow
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _reference(x, w, b, in_mask=None, out_mask=None):
    return mgemm.linear(x, w, b, in_mask=in_mask, out_mask=out_mask, backend="reference")


CASES = [  # rows, K, N, mask kind
    (1, 70, 150, "row"),  # batch-1 GEMV with odd sizes: partial K and N blocks
    (2, 130, 40, "row"),  # two rows, partial K blocks
    (1, 64, 64, "empty"),
    (2, 33, 17, "full"),
    (20, 96, 80, "shared"),  # tl.dot kernel
    (5, 96, 80, "shared"),  # shared mask, fewer rows than a tl.dot tile: padded
    (1, 96, 80, "shared"),  # one row: the GEMV kernel
    (40, 48, 70, "out"),  # output-masked tiles, some all dropped
]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(("rows", "k", "n", "kind"), CASES)
def test_triton_linear_matches_reference(rows, k, n, kind, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k, generator=g).clamp_min(-0.2).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    in_mask = out_mask = None
    if kind == "row":
        in_mask = torch.rand(rows, k, generator=g) < 0.5
    elif kind == "empty":
        in_mask = torch.zeros(rows, k, dtype=torch.bool)
    elif kind == "full":
        in_mask = torch.ones(rows, k, dtype=torch.bool)
    elif kind == "shared":
        in_mask = torch.rand(k, generator=g) < 0.5
    else:
        out_mask = torch.zeros(rows, n, dtype=torch.bool)
        out_mask[:32, :40] = torch.rand(32, 40, generator=g) < 0.5  # other tiles all dropped
    in_mask = in_mask.to(DEVICE) if in_mask is not None else None
    out_mask = out_mask.to(DEVICE) if out_mask is not None else None

    y, macs = mgemm.linear(x, w, b, in_mask=in_mask, out_mask=out_mask, backend="triton")
    expected, expected_macs = _reference(x, w, b, in_mask, out_mask)
    assert y.dtype == dtype and y.shape == expected.shape
    torch.testing.assert_close(y.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert int(macs) == int(expected_macs)


CONV_CASES = [  # batch, C in, C out, H, W, kernel, stride, padding, dilation, mask kind
    (2, 20, 17, 7, 6, 3, 1, 1, 1, "sample"),  # a mask per sample, odd sizes: partial tiles
    (1, 9, 40, 9, 9, 3, 2, 1, 1, "sample"),  # stride 2, one sample
    (3, 12, 8, 5, 7, 1, 1, 0, 1, "shared"),  # 1x1, one mask for every sample
    (1, 8, 6, 8, 8, (3, 2), (1, 2), (2, 0), (2, 1), "sample"),  # uneven kernel, stride, dilation
    (2, 16, 16, 4, 4, 3, 1, 1, 1, "empty"),  # the bias alone
    (2, 16, 16, 4, 4, 3, 1, 1, 1, "full"),
    (2, 40, 24, 5, 5, 3, 1, 1, 1, "drop_sample"),  # (B, 1, 1, 1): one sample dropped whole
]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    ("case", "channels_last"), [(c, False) for c in CONV_CASES] + [(CONV_CASES[0], True)]
)
def test_triton_conv2d_matches_reference(case, channels_last, dtype):
    """The channel-masked implicit-GEMM convolution against the reference: output, its memory
    format (the input's), and the MACs."""
    batch, c_in, c_out, h, w_, k, stride, padding, dilation, kind = case
    kh, kw = k if isinstance(k, tuple) else (k, k)
    g = torch.Generator().manual_seed(batch * 100 + c_in)
    x = torch.randn(batch, c_in, h, w_, generator=g).clamp_min(-0.2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(DEVICE, dtype)
    w = (torch.randn(c_out, c_in, kh, kw, generator=g) / (c_in * kh * kw) ** 0.5).to(DEVICE, dtype)
    b = torch.randn(c_out, generator=g).to(DEVICE, dtype)
    mask = {
        "sample": lambda: torch.rand(batch, c_in, 1, 1, generator=g) < 0.5,
        "shared": lambda: torch.rand(1, c_in, 1, 1, generator=g) < 0.5,
        "empty": lambda: torch.zeros(batch, c_in, 1, 1, dtype=torch.bool),
        "full": lambda: torch.ones(batch, c_in, 1, 1, dtype=torch.bool),
        "drop_sample": lambda: torch.tensor([True, False]).reshape(2, 1, 1, 1),
    }[kind]().to(DEVICE)
    args = (stride, padding, dilation)
    y, macs = mgemm.conv2d(x, w, b, *args, in_mask=mask, backend="triton")
    expected, expected_macs = mgemm.conv2d(x, w, b, *args, in_mask=mask, backend="reference")
    assert y.dtype == dtype and y.shape == expected.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert int(macs) == int(expected_macs)


# Each geometry compiles a kernel of its own on a GPU (about a second each): fewer cases there.
@settings(max_examples=10 if DEVICE == "cuda" else 30, deadline=None)
@given(
    batch=st.integers(1, 3),
    c_in=st.integers(1, 24),
    c_out=st.integers(1, 40),
    size=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    shared=st.booleans(),
    density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    dtype=st.sampled_from(list(TOL)),
    seed=st.integers(0, 2**16),
)
def test_triton_conv2d_on_random_cases(
    batch, c_in, c_out, size, kernel, stride, padding, dilation, shared, density, dtype, seed
):
    """Random shapes, geometries, channel masks (per sample or shared; empty to full) and
    dtypes, against the reference."""
    geometry = zip(size, padding, dilation, kernel, strict=True)
    if any(s + 2 * p - d * (k - 1) < 1 for s, p, d, k in geometry):
        return  # no output position
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *size, generator=g).clamp_min(-0.2).to(DEVICE, dtype)
    fan_in = c_in * kernel[0] * kernel[1]
    w = (torch.randn(c_out, c_in, *kernel, generator=g) / fan_in**0.5).to(DEVICE, dtype)
    b = torch.randn(c_out, generator=g).to(DEVICE, dtype)
    mask = (torch.rand(1 if shared else batch, c_in, 1, 1, generator=g) < density).to(DEVICE)
    args = (stride, padding, dilation)
    y, macs = mgemm.conv2d(x, w, b, *args, in_mask=mask, backend="triton")
    expected, expected_macs = mgemm.conv2d(x, w, b, *args, in_mask=mask, backend="reference")
    torch.testing.assert_close(y.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert int(macs) == int(expected_macs)


def test_selective_cnn_on_the_triton_backend_equals_the_reference():
    """A converted CNN (SAPI, channel masks; strides 1 and 2, a 1x1) asked to run on the
    ``triton`` backend gives the reference backend's outputs and MAC counts."""
    import copy

    import selact

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 8, 1),
    ).eval().to(DEVICE)  # fmt: skip
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        converted = selact.sparsify(
            copy.deepcopy(model), strategy="sapi", density=0.5, granularity="channel",
            backend=backend,
        )  # fmt: skip
        with torch.no_grad():
            y = converted(x)
        results.append((y, [s.executed_macs for s in selact.stats(converted).layers.values()]))
    (y, macs), (expected, expected_macs) = results
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert macs == expected_macs


def test_triton_conv2d_declines_what_it_cannot_serve():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    positions = torch.rand(1, 1, 5, 5) < 0.5
    for case, words in [
        (mgemm.conv2d_case(x, w, in_mask=positions), "channel or batch-shared"),
        (mgemm.conv2d_case(x, w), "without a mask"),
        (mgemm.conv2d_case(x, torch.randn(6, 2, 3, 3), groups=2), "ungrouped"),
    ]:
        assert words in mgemm.why_not("triton", case)


def test_interpreted_triton_is_never_chosen_automatically():
    if DEVICE == "cuda":
        pytest.skip("on a GPU the compiled kernels are chosen automatically")
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    case = mgemm.linear_case(x, w, in_mask=torch.ones(8, dtype=torch.bool))
    assert mgemm.choose(case).name != "triton"


VARIANTS = [  # (K split, weights one block ahead, kept rows listed first, sums fused)
    (1, False, False, False), (2, False, False, False), (4, False, False, False),
    (1, True, False, False), (3, True, False, False), (1, False, True, False),
    (3, False, True, False), (4, False, False, True), (3, False, True, True),
]  # fmt: skip


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tuner tries every candidate")
@pytest.mark.parametrize(("split", "ahead", "compact", "fused"), VARIANTS)
@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_every_variant_of_the_interpreted_kernels(rows, split, ahead, compact, fused, monkeypatch):
    """Both input-masked kernels with each K split (partial sums added by a second kernel or by
    each tile's last split), the GEMV with its weights loaded one block ahead or not, both walking
    every input or a list of the kept ones, bias included, against the reference; the interpreter
    runs the first candidate. Each mask runs twice: the fused sums leave their counts at 0."""
    from selact.mgemm import triton_kernels
    from selact.mgemm.triton_kernels import Tiles

    monkeypatch.setattr(triton_kernels, "_CHOSEN", {})
    monkeypatch.setattr(triton_kernels, "_COUNTS", {})
    rows_tiles = Tiles(32, 32, split, ahead=ahead, compact=compact, fused_sum=fused)
    monkeypatch.setattr(triton_kernels, "ROWS_TILES", [rows_tiles])
    shared_tiles = Tiles(32, 32, split, block_m=16, compact=compact, fused_sum=fused)
    monkeypatch.setattr(triton_kernels, "SHARED_TILES", [shared_tiles])
    g = torch.Generator().manual_seed(rows + 10 * split)
    x = torch.randn(rows, 200, generator=g).clamp_min(-0.3)
    w = torch.randn(50, 200, generator=g) / 14
    b = torch.randn(50, generator=g)
    masks = [torch.rand(200, generator=g) < 0.5, torch.rand(rows, 200, generator=g) < 0.5]
    masks += [torch.zeros(200, dtype=torch.bool), torch.ones(200, dtype=torch.bool)]
    for mask in masks:
        if mask.dim() == 2 and rows > 2:
            continue  # per-row masks: at most 2 rows (triton_backend.MAX_ROWS)
        expected, _ = _reference(x, w, b, mask)
        for _ in range(2):
            y, _ = mgemm.linear(x, w, b, in_mask=mask, backend="triton")
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    for counts in triton_kernels._COUNTS.values():
        assert not counts.any(), "a fused K split left a tile's count set"


def test_forget_tuning_makes_the_next_call_choose_again(monkeypatch):
    """The benchmark forgets the tile choices before each case: the next call picks again."""
    from selact.mgemm import triton_kernels

    picked = []
    monkeypatch.setattr(triton_kernels, "_CHOSEN", {})
    first, second = triton_kernels.Tiles(32, 32), triton_kernels.Tiles(64, 32)
    assert triton_kernels._pick(("rows", 1), [first, second], picked.append) == first
    triton_kernels._CHOSEN[("rows", 1)] = second
    assert triton_kernels._pick(("rows", 1), [first], picked.append) == second  # remembered
    triton_kernels.forget_tuning()
    assert triton_kernels._pick(("rows", 1), [first, second], picked.append) == first


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels compile for it in every test")
def test_every_kernel_compiles_for_a_hopper_gpu():
    """The interpreter checks what the kernels compute, not that they lower for a GPU: compile
    each (its variants) for sm_90 with Triton's ptxas, as scripts/compile_triton.py does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent.parent / "scripts" / "compile_triton.py"
    done = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--dtype", "bf16"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("bytes of shared memory") == 9
