"""MGEMM: every backend against an independent float64 computation, and MAC counts against
brute-force counts (explicit loops and ``unfold``)."""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import subprocess
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from selact import mgemm
from selact.mgemm import BACKENDS, Backend, BackendError
from selact.mgemm.registry import choose, forget_plans

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Per-element tolerance of a length-K dot product, scaled by sqrt(K) in ``_close``: about 4 ulps.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(actual, expected, dtype, k):
    tol = TOL[dtype] * math.sqrt(max(k, 1)) * 4
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def _backends(op):
    # The Triton interpreter is too slow for hypothesis: test_triton.py runs a few chosen cases.
    return [n for n in BACKENDS.names() if op in BACKENDS[n].ops and not _interpreted(n)]


def _interpreted(name):
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _mask(shape, kind, draw_seed):
    g = torch.Generator().manual_seed(draw_seed)
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=g) < 0.5


def _relu_input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).clamp_min(-0.3).to(dtype)  # some exact zeros


mask_kinds = st.sampled_from(["empty", "half", "full", "none"])


@pytest.mark.parametrize("backend", _backends("linear"))
@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    k=st.integers(1, 37),
    n=st.integers(1, 23),
    dtype=st.sampled_from(DTYPES),
    in_kind=mask_kinds,
    out_kind=mask_kinds,
    shared=st.booleans(),
    broadcast=st.lists(st.booleans(), min_size=2, max_size=2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_brute_force(
    backend, lead, k, n, dtype, in_kind, out_kind, shared, broadcast, bias, seed
):
    x = _relu_input((*lead, k), dtype, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    # (K,) shared by all rows, or x's shape with some row dims broadcast (size 1)
    ones = broadcast[: len(lead)]
    in_shape = (k,) if shared else (*(1 if o else d for d, o in zip(lead, ones, strict=True)), k)
    in_mask = None if in_kind == "none" else _mask(in_shape, in_kind, seed)
    out_mask = None if out_kind == "none" else _mask((*lead, n), out_kind, seed + 2)
    if mgemm.why_not(backend, mgemm.linear_case(x, w, b, in_mask=in_mask, out_mask=out_mask)):
        return  # a case this backend declines; the dispatcher never sends it there

    y, macs = mgemm.linear(x, w, b, in_mask=in_mask, out_mask=out_mask, backend=backend)

    rows = x.reshape(-1, k).double()
    kept_in = (
        torch.ones_like(rows, dtype=torch.bool)
        if in_mask is None
        else in_mask.expand(x.shape).reshape(-1, k)
    )
    kept_out = (
        torch.ones(rows.shape[0], n, dtype=torch.bool)
        if out_mask is None
        else out_mask.reshape(-1, n)
    )
    expected = torch.zeros(rows.shape[0], n, dtype=torch.float64)
    expected_macs = 0
    for r in range(rows.shape[0]):
        active = [i for i in range(k) if kept_in[r, i] and rows[r, i] != 0]
        for j in range(n):
            if not kept_out[r, j]:
                continue
            expected[r, j] = sum(rows[r, i] * w[j, i].double() for i in active)
            expected[r, j] += b[j].double() if b is not None else 0.0
            expected_macs += len(active)
    assert y.dtype == dtype and y.shape == (*lead, n)
    _close(y.reshape(-1, n), expected, dtype, k)
    assert macs.dtype == torch.int64 and macs.dim() == 0
    assert int(macs) == expected_macs


def _unfold_macs(kept, weight_shape, stride, padding, dilation, groups):
    """Kept inputs under each output position's receptive field, per group, via unfold."""
    c_out, c_in_g, kh, kw = weight_shape
    cols = F.unfold(kept.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(kept.shape[0], groups, c_in_g * kh * kw, -1)
    return int(cols.sum()) * (c_out // groups)


@pytest.mark.parametrize("backend", _backends("conv2d"))
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    c_in_g=st.integers(1, 4),
    c_out_g=st.integers(1, 3),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    dtype=st.sampled_from(DTYPES),
    granularity=st.sampled_from(
        [
            "element",
            "channel",
            "spatial",
            "spatial_shared",
            "spatial_full",
            "shared",
            "empty",
            "none",
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_conv2d_matches_brute_force(
    backend,
    batch,
    groups,
    c_in_g,
    c_out_g,
    size,
    kernel,
    stride,
    padding,
    dilation,
    dtype,
    granularity,
    seed,
):
    c_in, c_out = c_in_g * groups, c_out_g * groups
    h, w_ = size
    if (h + 2 * padding - dilation * (kernel - 1)) < 1 or (
        w_ + 2 * padding - dilation * (kernel - 1)
    ) < 1:
        return  # no output position
    x = _relu_input((batch, c_in, h, w_), dtype, seed)
    weight = torch.randn(c_out, c_in_g, kernel, kernel).to(dtype)
    bias = torch.randn(c_out).to(dtype)
    shape = {
        "element": x.shape,
        "channel": (batch, c_in, 1, 1),
        "spatial": (batch, 1, h, w_),
        "spatial_shared": (1, 1, h, w_),
        "spatial_full": (batch, 1, h, w_),
        "shared": (1, c_in, 1, 1),
        "empty": x.shape,
    }.get(granularity)
    kind = {"empty": "empty", "spatial_full": "full"}.get(granularity, "half")
    mask = None if shape is None else _mask(shape, kind, seed)
    args = (stride, padding, dilation, groups)
    if mgemm.why_not(backend, mgemm.conv2d_case(x, weight, bias, *args, in_mask=mask)):
        return

    y, macs = mgemm.conv2d(x, weight, bias, *args, in_mask=mask, backend=backend)

    kept_x = x if mask is None else x * mask
    expected = F.conv2d(kept_x.double(), weight.double(), bias.double(), *args)
    assert y.dtype == dtype and y.shape == expected.shape
    _close(y, expected, dtype, c_in_g * kernel * kernel)
    assert int(macs) == _unfold_macs(kept_x != 0, weight.shape, *args)


def test_conv2d_macs_dense_equals_standard_count_without_padding():
    x = torch.ones(2, 4, 6, 6)
    w = torch.ones(8, 2, 3, 3)
    _, macs = mgemm.conv2d(x, w, groups=2)
    assert int(macs) == 2 * 8 * 2 * 3 * 3 * 4 * 4 == mgemm.dense_conv2d_macs(w.shape, (2, 8, 4, 4))


def test_conv2d_macs_skip_padding():
    # 1x1 input, 3x3 kernel, padding 1: only the centre tap is a real input.
    _, macs = mgemm.conv2d(torch.ones(1, 1, 1, 1), torch.ones(5, 1, 3, 3), padding=1)
    assert int(macs) == 5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@settings(max_examples=100, deadline=None)
@given(
    batch=st.sampled_from([None, 1, 3]),  # None: an unbatched (C, H, W) input
    groups=st.sampled_from([1, 2]),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.sampled_from([1, 2, 3, (1, 2), (3, 1)]),
    padding=st.sampled_from([0, 1, 2, (0, 2), "valid", "same"]),
    dilation=st.sampled_from([1, 2, (2, 1)]),
    seed=st.integers(0, 2**16),
)
def test_conv2d_macs_match_a_ones_kernel_convolution(
    batch, groups, size, kernel, stride, padding, dilation, seed
):
    """The reach-weighted count equals the kept inputs under each output position's receptive
    field (a convolution with a ones kernel per group) on any geometry torch.nn.Conv2d takes."""
    stride = 1 if padding == "same" else stride  # torch refuses "same" with strides
    c_in_g, c_out = 2, 3 * groups
    shape = (groups * c_in_g, *size) if batch is None else (batch, groups * c_in_g, *size)
    kept = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    ones = torch.ones(groups, c_in_g, *kernel)
    try:
        windows = F.conv2d(kept.double(), ones.double(), None, stride, padding, dilation, groups)
    except RuntimeError:
        return  # no output position
    expected = int(windows.sum()) * (c_out // groups)
    weight_shape = (c_out, c_in_g, *kernel)
    assert int(mgemm.conv2d_macs(kept, weight_shape, stride, padding, dilation, groups)) == expected


@pytest.mark.parametrize("backend", _backends("attention_values"))
@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    lq=st.integers(1, 6),
    lk=st.integers(1, 9),
    d=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    kind=mask_kinds,
    renormalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_values_matches_brute_force(
    backend, lead, lq, lk, d, dtype, kind, renormalize, seed
):
    probs = torch.randn(*lead, lq, lk).softmax(-1).to(dtype)
    v = torch.randn(*lead, lk, d).to(dtype)
    mask = None if kind == "none" else _mask(probs.shape, kind, seed)
    if mgemm.why_not(backend, mgemm.attention_values_case(probs, v, key_mask=mask)):
        return

    out, macs = mgemm.attention_values(
        probs, v, key_mask=mask, renormalize=renormalize, backend=backend
    )

    p = probs.double().reshape(-1, lq, lk)
    m = torch.ones_like(p, dtype=torch.bool) if mask is None else mask.reshape(-1, lq, lk)
    vv = v.double().reshape(-1, lk, d)
    expected = torch.zeros(p.shape[0], lq, d, dtype=torch.float64)
    expected_macs = 0
    for b in range(p.shape[0]):
        for q in range(lq):
            kept = [j for j in range(lk) if m[b, q, j] and p[b, q, j] != 0]
            total = sum(p[b, q, j] for j in kept) if (mask is not None and renormalize) else 1.0
            for j in kept:
                expected[b, q] += p[b, q, j] / total * vv[b, j]
            expected_macs += len(kept) * d
    _close(out.reshape(-1, lq, d), expected, dtype, lk)
    assert int(macs) == expected_macs


def test_gradients_flow_through_kept_inputs_only():
    x = torch.randn(3, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    mask = torch.rand(3, 6) < 0.5
    y, _ = mgemm.linear(x, w, in_mask=mask)
    y.sum().backward()
    assert torch.all(x.grad[~mask] == 0)
    torch.testing.assert_close(x.grad[mask], w.sum(0).expand(3, 6)[mask])
    torch.testing.assert_close(w.grad, (x * mask).sum(0).expand(4, 6).detach())


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: mgemm.linear(torch.randn(2, 5), torch.randn(3, 4)), ValueError, "expects 4"),
        (lambda: mgemm.linear(torch.randn(2, 4), torch.randn(3, 4).double()), TypeError, "dtype"),
        (lambda: mgemm.linear(torch.randn(2, 4).int(), torch.randn(3, 4)), TypeError, "float"),
        (
            lambda: mgemm.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)),
            ValueError,
            "bias",
        ),
        (
            lambda: mgemm.linear(torch.randn(2, 4), torch.randn(3, 4), in_mask=torch.ones(2, 4)),
            TypeError,
            "bool",
        ),
        (
            lambda: mgemm.linear(
                torch.randn(2, 4), torch.randn(3, 4), in_mask=torch.ones(3, 4, dtype=torch.bool)
            ),
            ValueError,
            "broadcast",
        ),
        (
            lambda: mgemm.linear(
                torch.randn(2, 4),
                torch.randn(3, 4),
                in_mask=torch.ones(4, dtype=torch.bool, device="meta"),
            ),
            ValueError,
            "meta",
        ),
        (
            lambda: mgemm.conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 2, 3, 3)),
            ValueError,
            "groups",
        ),
        (
            lambda: mgemm.attention_values(torch.rand(2, 3, 4), torch.rand(2, 5, 4)),
            ValueError,
            "do not match",
        ),
    ],
)
def test_bad_input_raises_clear_errors(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.fixture
def fake_backend(monkeypatch):
    """A CPU float32-only backend that records its calls."""
    calls = []

    def linear(x, weight, bias=None, *, in_mask=None, out_mask=None, count=True):
        calls.append("fake")
        return BACKENDS["reference"].ops["linear"](
            x, weight, bias, in_mask=in_mask, out_mask=out_mask, count=count
        )

    backend = Backend(
        "fake",
        frozenset({"cpu"}),
        frozenset({torch.float32}),
        {"linear": linear},
        priority=100,
        differentiable=False,
    )
    monkeypatch.setitem(BACKENDS._entries, "fake", backend)
    monkeypatch.delenv("SELACT_BACKEND", raising=False)
    monkeypatch.setattr("selact.mgemm.registry._warned", set())
    monkeypatch.setattr("selact.mgemm.registry._plans", {})
    forget_plans()  # the cpu backend's own plans too: a signature it served goes to "fake" now
    return calls


def test_dispatch_prefers_fast_backend_and_falls_back_with_one_warning(fake_backend):
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    mgemm.linear(x, w)
    assert fake_backend == ["fake"]
    with pytest.warns(UserWarning, match="reference") as record:
        mgemm.linear(x.half(), w.half())
    assert record[0].filename == __file__  # it points at the caller, not at selact's dispatch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgemm.linear(x.half(), w.half())  # warned once only
        with torch.enable_grad():  # an inference-only backend is skipped when grads are needed
            mgemm.linear(x, w.requires_grad_())
            # training is the reference's job: no warning where a fast backend declines it
            x4, w4 = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3, requires_grad=True)
            mgemm.conv2d(x4, w4, in_mask=torch.rand(1, 2, 4, 4) < 0.5)
    assert fake_backend == ["fake"]


def test_operands_are_validated_once_per_signature(fake_backend, monkeypatch):
    validated = []
    check = mgemm.linear_case
    monkeypatch.setattr(mgemm, "linear_case", lambda *a, **k: validated.append(1) or check(*a, **k))
    x, w, m = torch.randn(2, 4), torch.randn(3, 4), torch.ones(4, dtype=torch.bool)
    for _ in range(3):
        mgemm.linear(x, w, in_mask=m)
    assert len(validated) == 1 and fake_backend == ["fake"] * 3
    mgemm.linear(torch.randn(5, 4), w, in_mask=m)  # a new shape: checked again
    assert len(validated) == 2
    with pytest.raises(ValueError, match="expects 4 input features"):
        mgemm.linear(torch.randn(2, 5), w)
    with pytest.raises(TypeError, match="bool"):
        mgemm.linear(x, w, in_mask=m.float())
    with pytest.raises(TypeError, match="must be a tensor"):
        mgemm.linear(x.tolist(), w)
    with pytest.raises(ValueError, match="on meta"):
        mgemm.linear(x, w.to("meta"))


def test_named_backend_raises_when_it_cannot_serve(fake_backend, monkeypatch):
    with pytest.raises(BackendError, match="float16"):
        mgemm.linear(torch.randn(2, 4).half(), torch.randn(3, 4).half(), backend="fake")
    with pytest.raises(BackendError, match="known: .*reference"):
        mgemm.linear(torch.randn(2, 4), torch.randn(3, 4), backend="nope")
    monkeypatch.setenv("SELACT_BACKEND", "fake")
    with pytest.raises(BackendError, match="conv2d"):
        mgemm.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))
    mgemm.linear(torch.randn(2, 4), torch.randn(3, 4), backend="reference")  # argument wins
    assert fake_backend == []


@pytest.mark.parametrize(
    ("backend", "case"),
    [
        (
            "cpu",
            lambda: mgemm.linear_case(
                torch.randn(1, 768), torch.randn(96, 768), in_mask=torch.rand(1, 768) < 0.5
            ),
        ),
        (
            "cpu",
            lambda: mgemm.linear_case(
                torch.randn(8, 64), torch.randn(96, 64), in_mask=torch.rand(64) < 0.5
            ),
        ),
        (
            "cpu",  # a token sequence's per-sample feature mask: one GEMM per sample
            lambda: mgemm.linear_case(
                torch.randn(2, 65, 192), torch.randn(96, 192), in_mask=torch.rand(2, 1, 192) < 0.5
            ),
        ),
        (
            "gather",
            lambda: mgemm.conv2d_case(
                torch.randn(2, 8, 5, 5),
                torch.randn(4, 8, 3, 3),
                in_mask=torch.rand(2, 8, 1, 1) < 0.5,
            ),
        ),
        (
            "cpu-conv",
            lambda: mgemm.conv2d_case(
                torch.randn(1, 32, 4, 4),
                torch.randn(16, 32, 3, 3),
                padding=1,
                in_mask=torch.rand(1, 32, 1, 1) < 0.5,
            ),
        ),
        (
            "cpu-conv",  # spatial masks at stride 1: the kept positions, scattered
            lambda: mgemm.conv2d_case(
                torch.randn(2, 8, 5, 5),
                torch.randn(4, 8, 3, 3),
                padding=1,
                in_mask=torch.rand(2, 1, 5, 5) < 0.5,
            ),
        ),
    ],
)
def test_fast_backends_serve_the_cases_they_exist_for(backend, case):
    if backend == "cpu-conv":
        backend = "cpu"
    # The hypothesis tests above skip the cases a backend declines: make sure that the cases each
    # backend is built for are served, so those tests do compare it with the brute force.
    assert mgemm.why_not(backend, case()) is None


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    c_in=st.integers(1, 20),
    c_out=st.integers(1, 37),  # beyond one and two 16-float registers of outputs
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    kind=st.sampled_from(["half", "empty", "full", "shared"]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpu_spatial_conv_matches_brute_force(
    batch, c_in, c_out, size, kernel, stride, padding, dilation, kind, channels_last, seed
):
    """The ``cpu`` backend's spatially masked convolution (any stride: at stride s each tap
    multiplies the positions of its residue class) against float64 PyTorch on the masked input,
    and its MACs against an independent count (unfold)."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    h, w_ = size
    if any(
        s + 2 * p - d * (k - 1) < 1
        for s, p, d, k in zip(size, padding, dilation, kernel, strict=True)
    ):
        return  # no output position
    x = _relu_input((batch, c_in, h, w_), torch.float32, seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c_out, c_in, *kernel), torch.randn(c_out)
    shape = (1 if kind == "shared" else batch, 1, h, w_)
    mask = _mask(shape, {"shared": "half"}.get(kind, kind), seed)
    args = (stride, padding, dilation, 1)
    if h * w_ == 1:  # one position: a (B, 1, 1, 1) mask keeps or drops samples, not positions
        return
    y, macs = cpu.conv2d(x, weight, bias, *args, in_mask=mask)
    expected = F.conv2d((x * mask).double(), weight.double(), bias.double(), *args)
    _close(y, expected, torch.float32, c_in * kernel[0] * kernel[1])
    assert int(macs) == _unfold_macs((x * mask) != 0, weight.shape, *args)


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 3),
    c_in=st.integers(1, 40),  # within one 16-channel register and across two or three
    c_out=st.integers(1, 70),  # beyond the 64 output columns a scatter call holds in registers
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 3)),  # rows of 4-5 taps: the gather form
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    kind=st.sampled_from(["half", "empty", "full", "shared"]),
    x_channels_last=st.booleans(),
    mask_channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(  # ResNet's downsampling layer (the row form at stride 2), an odd width, 2 registers
    batch=1, c_in=16, c_out=32, size=(9, 9), kernel=(3, 3), stride=(2, 2), padding=(1, 1),
    dilation=(1, 1), kind="half", x_channels_last=True, mask_channels_last=True, seed=0,
)  # fmt: skip
@example(  # 256 outputs and more: the gather form on AVX2, a 17th register of outputs
    batch=2, c_in=20, c_out=272, size=(4, 5), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
    dilation=(1, 1), kind="half", x_channels_last=True, mask_channels_last=False, seed=1,
)  # fmt: skip
def test_cpu_element_conv_matches_brute_force(
    batch, c_in, c_out, size, kernel, stride, padding, dilation, kind, x_channels_last,
    mask_channels_last, seed,
):  # fmt: skip
    """The ``cpu`` backend's element-masked convolution (the scatter form at any stride with
    kernel rows of at most 3 reaching taps, by whole input rows at horizontal dilation 1 and
    stride 1, or stride 2 with 3 taps, the gather form otherwise; either memory format of x and
    the mask) against float64 PyTorch on the masked input, and its MACs against an independent
    count (unfold)."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    if any(
        s + 2 * p - d * (k - 1) < 1
        for s, p, d, k in zip(size, padding, dilation, kernel, strict=True)
    ):
        return  # no output position
    x = _relu_input((batch, c_in, *size), torch.float32, seed)
    if x_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c_out, c_in, *kernel), torch.randn(c_out)
    mask = _mask(
        (1 if kind == "shared" else batch, c_in, *size), {"shared": "half"}.get(kind, kind), seed
    )
    if mask_channels_last:
        mask = mask.contiguous(memory_format=torch.channels_last)
    args = (stride, padding, dilation, 1)
    y, kept, macs = cpu.KERNELS["element_conv"](
        x, mask, 0, None, weight, bias, *cpu.conv_geometry(*args[:3]), True
    )
    assert kept is None  # the mask was given
    expected = F.conv2d((x * mask).double(), weight.double(), bias.double(), *args)
    _close(y, expected, torch.float32, c_in * kernel[0] * kernel[1])
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert int(macs) == _unfold_macs((x * mask) != 0, weight.shape, *args)


def test_cpu_element_conv_is_served_and_planned():
    """Element masks (B or 1, C, H, W) go to the ``cpu`` backend's element kernel, planned like the
    other masks; a mask of other sizes is declined with the reason."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    forget_plans()
    x, w, b = torch.randn(2, 6, 7, 7).relu(), torch.randn(5, 6, 3, 3), torch.randn(5)
    mask = torch.rand(2, 6, 7, 7) < 0.4
    assert choose(mgemm.conv2d_case(x, w, b, 1, 1, in_mask=mask)).name == "cpu"
    expected = F.conv2d(x * mask, w, b, 1, 1)
    for _ in range(2):  # planned by the first call, served by the plan
        y, macs = mgemm.conv2d(x, w, b, 1, 1, in_mask=mask)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        assert int(macs) == _unfold_macs((x * mask) != 0, w.shape, 1, 1, 1, 1)
    planned = cpu.PLANNED["conv2d"](x, w, b, 1, 1, 1, 1, mask, False, None)
    assert planned is not None
    torch.testing.assert_close(planned[0], expected, rtol=1e-4, atol=1e-4)
    reason = mgemm.why_not("cpu", mgemm.conv2d_case(x, w, b, 1, 1, in_mask=mask[:, :, :1]))
    assert reason is not None and "element masks of (B or 1, C, H, W)" in reason


def test_cpu_spatial_conv_plans_its_calls_at_any_stride():
    """Spatial masks are planned like the channel masks (later calls go straight to the kernel),
    at stride 1 and 2; a mask broadcast over rows is declined with the reason."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    forget_plans()
    x, w, b = torch.randn(2, 6, 7, 7), torch.randn(5, 6, 3, 3), torch.randn(5)
    mask = torch.rand(2, 1, 7, 7) < 0.4
    for stride in (1, 2):
        expected = F.conv2d(x * mask, w, b, stride, 1)
        for _ in range(2):  # planned by the first call, served by the plan
            y, macs = mgemm.conv2d(x, w, b, stride, 1, in_mask=mask)
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert int(macs) == _unfold_macs((x * mask) != 0, w.shape, stride, 1, 1, 1)
        planned = cpu.PLANNED["conv2d"](x, w, b, stride, 1, 1, 1, mask, False, None)
        assert planned is not None
        torch.testing.assert_close(planned[0], expected, rtol=1e-4, atol=1e-4)
    case = mgemm.conv2d_case(x, w, b, 2, 1, in_mask=mask[:, :, :1])
    reason = mgemm.why_not("cpu", case)
    assert reason is not None and "(B or 1, 1, H, W)" in reason


def test_planned_cpu_calls_follow_what_their_signature_depends_on(monkeypatch):
    """Calls of a signature the dispatcher gave the ``cpu`` backend are served by its kernels
    without Python; whatever the choice depends on still counts: the backend asked for (argument
    or ``SELACT_BACKEND``), gradients, the operands' shapes and dtypes, the registry."""
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    monkeypatch.delenv("SELACT_BACKEND", raising=False)
    forget_plans()
    x, w, b = torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3), torch.randn(4)
    mask = torch.rand(1, 8, 1, 1) < 0.5
    expected = mgemm.conv2d(x, w, b, 1, 1, in_mask=mask, backend="reference")[0]

    def served_by_cpu(**kwargs) -> bool:  # the cpu backend's output is channels-last
        y = mgemm.conv2d(x, w, b, 1, 1, in_mask=mask, **kwargs)[0]
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        return y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()

    assert served_by_cpu() and served_by_cpu()  # planned by the first call, served by the plan
    assert cpu.PLANNED["conv2d"](x, w, b, 1, 1, 1, 1, mask, True, None) is not None
    assert not served_by_cpu(backend="reference")
    monkeypatch.setenv("SELACT_BACKEND", "reference")
    assert not served_by_cpu()
    monkeypatch.delenv("SELACT_BACKEND")
    assert served_by_cpu()
    with torch.enable_grad():  # the cpu backend is inference-only
        w.requires_grad_()
        assert mgemm.conv2d(x, w, b, 1, 1, in_mask=mask)[0].grad_fn is not None
        w.requires_grad_(False)
    assert cpu.PLANNED["conv2d"](x, w, b, 1, 1, 1, 1, mask, True, None) is not None
    forget_plans()  # as when a backend is registered
    assert cpu.PLANNED["conv2d"](x, w, b, 1, 1, 1, 1, mask, True, None) is None
    assert served_by_cpu()
    with pytest.raises(TypeError, match="dtype"):  # a new signature: checked again
        mgemm.conv2d(x, w, b.double(), 1, 1, in_mask=mask)
    # a linear layer's plan; an in-place update of its weight is seen at once
    xl, wl, ml = torch.randn(3, 8), torch.randn(5, 8), torch.rand(3, 8) < 0.5
    for _ in range(2):
        y, macs = mgemm.linear(xl, wl, in_mask=ml)
        torch.testing.assert_close(y, (xl * ml) @ wl.t(), rtol=1e-4, atol=1e-4)
        assert int(macs) == int(((xl != 0) & ml).sum()) * 5
        with torch.no_grad():
            wl.mul_(-2)
    assert cpu.PLANNED["linear"](xl, wl, None, ml, None, False, None)[1] is None  # not counted

    class Tagged(torch.Tensor):  # a tensor subclass may mean something else: Python decides
        pass

    assert cpu.PLANNED["linear"](xl.as_subclass(Tagged), wl, None, ml, None, False, None) is None


def test_cpu_packed_weight_is_released_with_its_weight():
    from selact.mgemm import cpu

    if not cpu.available():
        pytest.skip("the CPU kernels could not be built")
    w = torch.randn(40, 24)
    mgemm.linear(torch.randn(1, 24), w, backend="cpu")  # packed by the kernel
    packed = weakref.ref(cpu.packed_weight(w))
    gc.collect()
    assert packed() is not None  # held by the kernels' cache
    del w
    gc.collect()
    assert packed() is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize(
    "march", ["skylake-avx512", "haswell", "x86-64"], ids=["avx512", "avx2", "portable"]
)
def test_cpu_kernel_source_compiles_for_each_instruction_set(march):
    """The kernel has an AVX-512, an AVX2 and a portable build, of which a machine runs the one
    its CPU takes (the tests above check that one's results): each of the others must compile
    too, checked here with the flags torch's extension builder uses."""
    import sysconfig

    from torch.utils import cpp_extension

    from selact.mgemm import cpu

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler: the CPU kernels cannot be built here")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = [
        compiler, "-fsyntax-only", "-std=c++20", "-fopenmp", f"-march={march}",
        "-DTORCH_EXTENSION_NAME=selact_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
        *(f"-isystem{path}" for path in includes), str(cpu._SOURCE),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize(("n", "k"), [(10, 7), (3072, 768), (1000, 600)])
def test_cpu_packed_weight_layout(n, k):
    """The CPU kernels' packed weight: Wᵀ, outputs zero-padded to 16, starting on a page (on a
    2-MB boundary from 2 MB up, for huge pages), rebuilt after an in-place update."""
    from selact.mgemm import cpu

    w = torch.randn(n, k)
    packed = cpu.packed_weight(w)
    assert packed.shape == (k, -(-n // 16) * 16)
    assert torch.equal(packed[:, :n], w.t()) and not packed[:, n:].any()
    huge = 2 << 20
    assert packed.data_ptr() % (huge if packed.numel() * 4 >= huge else 4096) == 0
    assert cpu.packed_weight(w) is packed
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(cpu.packed_weight(w)[:, :n], w.t())


@pytest.fixture
def two_threads():
    """Two threads for the test, as on the 2-core machines the side-by-side rules are set for."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [2, 3, 8, 9])
@pytest.mark.parametrize("shared", [False, True])
def test_cpu_conv_batch_equals_its_samples_one_by_one(batch, shared, two_threads):
    """A batch's samples run side by side, one thread each (2 threads: even batches, or 8 samples
    and more), or one after another on all threads: either way each sample's output and MACs are
    exactly those of the sample alone."""
    from selact.mgemm import cpu

    torch.manual_seed(batch)
    x = torch.relu(torch.randn(batch, 12, 7, 9))
    weight, bias = torch.randn(10, 12, 3, 3), torch.randn(10)
    mask = torch.rand(1 if shared else batch, 12, 1, 1) < 0.5
    y, macs = cpu.conv2d(x, weight, bias, 2, 1, in_mask=mask)
    alone = [
        cpu.conv2d(x[i : i + 1], weight, bias, 2, 1, in_mask=mask[i % len(mask)][None])
        for i in range(batch)
    ]
    assert torch.equal(y, torch.cat([a[0] for a in alone]))
    assert int(macs) == sum(int(a[1]) for a in alone)
    expected = mgemm.conv2d(x, weight, bias, 2, 1, in_mask=mask, backend="reference")
    torch.testing.assert_close(y, expected[0], rtol=1e-4, atol=1e-4)
    assert int(macs) == int(expected[1])


@pytest.mark.parametrize(("samples", "tokens"), [(2, 3), (3, 8), (9, 8), (12, 10)])
def test_cpu_linear_token_runs_equal_their_samples_one_by_one(samples, tokens, two_threads):
    """Per-sample masks on token sequences: up to 8 samples, or any number of 8 tokens or more
    (side by side on 2 threads when they share evenly); each sample's output and MACs are
    exactly those of the sample alone. Shorter runs beyond 8 are declined."""
    from selact.mgemm import cpu

    torch.manual_seed(samples)
    x = torch.relu(torch.randn(samples, tokens, 24))
    weight, bias = torch.randn(40, 24), torch.randn(40)
    mask = torch.rand(samples, 1, 24) < 0.5
    y, macs = mgemm.linear(x, weight, bias, in_mask=mask, backend="cpu")
    alone = [cpu.linear(x[i], weight, bias, in_mask=mask[i, 0]) for i in range(samples)]
    assert torch.equal(y, torch.stack([a[0] for a in alone]))
    assert int(macs) == sum(int(a[1]) for a in alone)
    expected = mgemm.linear(x, weight, bias, in_mask=mask, backend="reference")
    torch.testing.assert_close(y, expected[0], rtol=1e-4, atol=1e-4)
    assert int(macs) == int(expected[1])
    short = mgemm.linear_case(torch.randn(9, 2, 24), weight, in_mask=torch.rand(9, 1, 24) < 0.5)
    assert "limit" in mgemm.why_not("cpu", short)  # 9 runs of 2 rows: each re-reads its weights


def _mask_layouts(x_shape, seed):
    """Masks broadcastable to ``x_shape`` (B, T, K) in the layouts a caller may pass: contiguous
    per row, per sample (B, 1, K), shared with extra leading ones, expanded (stride 0), sliced
    (non-contiguous), transposed, a feature size of 1 (whole rows kept or dropped)."""
    b, t, k = x_shape
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g) < 0.5

    return {
        "per row": rand(b, t, k),
        "per sample": rand(b, 1, k),
        "shared, leading ones": rand(1, 1, k),
        "per token position": rand(t, k),
        "expanded": rand(b, 1, k).expand(b, t, k),
        "sliced": rand(b, t, 2 * k)[..., ::2],
        "transposed": rand(b, k, t).transpose(1, 2),
        "whole rows": rand(b, t, 1),
    }


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 9),
    t=st.integers(1, 10),
    k=st.integers(1, 40),
    layout=st.sampled_from(list(_mask_layouts((1, 1, 1), 0))),
    seed=st.integers(0, 2**16),
)
def test_cpu_linear_reads_masks_of_any_layout(b, t, k, layout, seed):
    """The CPU kernel takes ``x`` (..., K) and the mask as given (it reads both in place where it
    can, else copies the mask into its (runs, K) rows): outputs and MACs are the reference's."""
    x = _relu_input((b, t, k), torch.float32, seed)
    w, bias = torch.randn(7, k), torch.randn(7)
    mask = _mask_layouts((b, t, k), seed)[layout]
    case = mgemm.linear_case(x, w, bias, in_mask=mask)
    if mgemm.why_not("cpu", case):
        return  # too many short runs: the dispatcher never sends it there
    y, macs = mgemm.linear(x, w, bias, in_mask=mask, backend="cpu")
    expected, expected_macs = mgemm.linear(x, w, bias, in_mask=mask, backend="reference")
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert int(macs) == int(expected_macs)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 70),
    n=st.integers(1, 50),
    k_fraction=st.floats(0.0, 1.0),
    ties=st.booleans(),
    nans=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_cpu_topk_mask_keeps_the_amu_top_k(rows, n, k_fraction, ties, nans, seed):
    """The CPU kernel's top-k: per row the k first by (NaN first, larger first, lower index)."""
    from selact.mgemm import cpu

    assert cpu.available()
    torch.manual_seed(seed)
    scores = torch.randn(rows, n)
    if ties:  # few distinct values: many ties, broken by the lower index
        scores = scores.round()
    scores.view(-1)[torch.randperm(rows * n)[:nans]] = float("nan")
    k = round(k_fraction * n)
    keep = cpu.topk_mask(scores, k)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    for row, kept in zip(scores.tolist(), keep.tolist(), strict=True):
        order = sorted(
            range(n), key=lambda i: (not math.isnan(row[i]), -row[i] if row[i] == row[i] else 0, i)
        )
        assert [i for i in range(n) if kept[i]] == sorted(order[:k])


@settings(max_examples=12, deadline=None)
@given(
    n=st.sampled_from([8191, 8192, 9000, 20000]),
    k_fraction=st.floats(0.0, 1.0),
    data=st.sampled_from(["uniform", "relu", "rounded", "constant"]),
    nans=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_cpu_topk_mask_on_long_rows_equals_a_stable_sort(n, k_fraction, data, nans, seed):
    """Long rows take a histogram first (and many equal keys end in one bucket): the kept set is
    still the k first of a stable descending sort (NaN first, ties to the lower index)."""
    from selact.mgemm import cpu

    assert cpu.available()
    torch.manual_seed(seed)
    scores = {
        "uniform": lambda: torch.rand(3, n),
        "relu": lambda: torch.randn(3, n).relu(),  # half the scores tie at zero
        "rounded": lambda: (torch.randn(3, n) * 3).round(),
        "constant": lambda: torch.ones(3, n),
    }[data]()
    scores.view(-1)[torch.randperm(3 * n)[:nans]] = float("nan")
    k = round(k_fraction * n)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    expected = torch.zeros(3, n, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(cpu.topk_mask(scores, k), expected)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_reference_drops_non_finite_inputs_and_passes_gradients_to_kept_ones(bad):
    """Masking is a product on finite CPU inputs (faster than where()) and where() otherwise: a
    dropped inf or NaN stays out of the result either way, and only kept inputs get gradients."""
    torch.manual_seed(0)
    w = torch.randn(3, 6)
    mask = torch.tensor([[True, False, True, True, False, True]] * 2)
    x = torch.randn(2, 6, requires_grad=True)
    y, _ = mgemm.linear(x, w, in_mask=mask, backend="reference")  # finite: the product
    y.sum().backward()
    assert torch.equal(x.grad != 0, mask)
    torch.testing.assert_close(y, (x * mask) @ w.t())
    bad_x = x.detach().clone()
    bad_x[0, 1] = bad  # a dropped entry
    y_bad, macs = mgemm.linear(bad_x, w, in_mask=mask, backend="reference")  # where()
    torch.testing.assert_close(y_bad, y.detach())
    assert int(macs) == int(mask.sum()) * 3
    image = torch.randn(1, 2, 4, 4)
    image[0, 1, 2, 2] = bad
    channel = torch.tensor([True, False]).reshape(1, 2, 1, 1)
    out, _ = mgemm.conv2d(image, torch.randn(3, 2, 3, 3), in_mask=channel, backend="reference")
    assert torch.isfinite(out).all()
