"""The Triton kernels against the reference, run by Triton's interpreter on the CPU where there is
no GPU (``TRITON_INTERPRET=1``, set in conftest.py). The interpreter is slow and gave wrong bf16
``tl.dot`` results (DESIGN.md section 5), so these cases are few, small, float32 and float16."""

from __future__ import annotations

import pytest
import torch

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


def test_interpreted_triton_is_never_chosen_automatically():
    if DEVICE == "cuda":
        pytest.skip("on a GPU the compiled kernels are chosen automatically")
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    case = mgemm.linear_case(x, w, in_mask=torch.ones(8, dtype=torch.bool))
    assert mgemm.choose(case).name != "triton"


VARIANTS = [  # (K split, weights one block ahead, kept rows listed first)
    (1, False, False), (2, False, False), (4, False, False), (1, True, False), (3, True, False),
    (1, False, True), (3, False, True),
]  # fmt: skip


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tuner tries every candidate")
@pytest.mark.parametrize(("split", "ahead", "compact"), VARIANTS)
@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_every_variant_of_the_interpreted_kernels(rows, split, ahead, compact, monkeypatch):
    """Both input-masked kernels with each K split (partial sums added by a second kernel), the
    GEMV with its weights loaded one block ahead or not, both walking every input or a list of the
    kept ones, bias included, against the reference; the interpreter runs the first candidate."""
    from selact.mgemm import triton_kernels
    from selact.mgemm.triton_kernels import Tiles

    monkeypatch.setattr(triton_kernels, "_CHOSEN", {})
    rows_tiles = Tiles(32, 32, split, ahead=ahead, compact=compact)
    monkeypatch.setattr(triton_kernels, "ROWS_TILES", [rows_tiles])
    shared_tiles = Tiles(32, 32, split, block_m=16, compact=compact)
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
        y, _ = mgemm.linear(x, w, b, in_mask=mask, backend="triton")
        expected, _ = _reference(x, w, b, mask)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


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
