"""Triton kernels of the ``triton`` backend (imported on first use: importing Triton is slow).

- :func:`rows_linear`: ``y = (M ⊙ x) Wᵀ + b`` for a few rows. One program per (output block,
  row, K split); the loads of dropped or zero inputs' weight rows are masked off, so their bytes
  are never read (the idea of TEAL's GEMV, with the mask given instead of a threshold).
- :func:`shared_linear`: the same for a mask shared by all rows, as a tiled ``tl.dot`` product
  that reads each kept weight row once per block of rows.
- :func:`out_masked_linear`: ``y = M_out ⊙ (x Wᵀ + b)``; tiles whose mask is all zero skip their
  products.

Weights are read as ``Wᵀ`` (K, N), contiguous, so that a kept input's weights are one row.
Accumulation is float32; split-K partial sums meet by atomic adds (their order is not fixed).
Block sizes and the K split are autotuned on the GPU per shape (``ROWS_CONFIGS``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _tuned(configs, key):
    """``triton.autotune`` on a GPU; the first config alone in the interpreter (tuning there would
    only cost time) or with ``SELACT_TRITON_AUTOTUNE=0``. The output buffer is zeroed between
    trials: split-K programs add into it."""
    if INTERPRETING or os.environ.get("SELACT_TRITON_AUTOTUNE") == "0":
        return lambda kernel: _FixedConfig(kernel, configs[0])
    return triton.autotune(configs=configs, key=key, reset_to_zero=["y_ptr"])


class _FixedConfig:
    """A kernel launched with one fixed config, with autotune's calling convention."""

    def __init__(self, kernel, config):
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        meta = dict(self.config.kwargs)
        grid = grid(meta) if callable(grid) else grid
        return lambda *args, **kwargs: self.kernel[grid](
            *args,
            **kwargs,
            **meta,
            num_warps=self.config.num_warps,
            num_stages=self.config.num_stages,
        )


def _configs(num_warps=(4,), num_stages=(3,), **choices):
    combos = [{}]
    for key, values in choices.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return [
        triton.Config(c, num_warps=w, num_stages=s)
        for c in combos
        for w in num_warps
        for s in num_stages
    ]


#: Candidates of the autotuning (the first is the interpreter's config), tuned on the GPU per
#: shape at first use. The GEMV stores its rows directly (no split of K: a float32 buffer and a
#: cast would add two kernels to a 20-40 us call); small output blocks give it parallelism.
ROWS_CONFIGS = _configs(BLOCK_N=[64, 32, 128], BLOCK_K=[32, 64], num_warps=(4, 8))
#: The shared-mask GEMM splits K (partial sums added into a float32 buffer) when its output tiles
#: are too few to fill the GPU.
SHARED_CONFIGS = _configs(BLOCK_M=[16], BLOCK_N=[64, 128], BLOCK_K=[64], SPLIT_K=[2, 1, 4])
#: Output-masked GEMM tiles.
OUT_CONFIGS = _configs(BLOCK_M=[32, 64, 128], BLOCK_N=[64, 128], BLOCK_K=[32, 64])[:8]


@_tuned(ROWS_CONFIGS, key=["K", "N"])
@triton.jit
def _rows_kernel(
    x_ptr, m_ptr, wt_ptr, b_ptr, y_ptr, K, N, stride_x, stride_m, stride_w, stride_y,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # A (BLOCK_K, BLOCK_N) accumulator, reduced over K once at the end: a reduction across
    # threads in every step would cost more than the loads it waits for.
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xv = tl.load(x_ptr + row * stride_x + offs_k, mask=k_ok, other=0.0)
        keep = k_ok & (xv != 0)
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + row * stride_m + offs_k, mask=k_ok, other=0) != 0)
        w = tl.load(  # the rows of dropped or zero inputs are never read
            wt_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
            mask=keep[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc += xv.to(tl.float32)[:, None] * w.to(tl.float32)
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@_tuned(SHARED_CONFIGS, key=["R", "K", "N"])
@triton.jit
def _shared_kernel(
    x_ptr,
    m_ptr,
    wt_ptr,
    b_ptr,
    y_ptr,
    R,
    K,
    N,
    stride_x,
    stride_w,
    stride_y,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    k_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < R
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        keep = offs_k < k_end
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + offs_k, mask=keep, other=0) != 0)
        xv = tl.load(
            x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
            mask=m_ok[:, None] & keep[None, :],
            other=0.0,
        )
        w = tl.load(
            wt_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
            mask=keep[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(xv, w, input_precision="ieee")
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_y + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=ok)
    else:
        tl.store(ptrs, acc, mask=ok)


@_tuned(OUT_CONFIGS, key=["R", "N", "K"])
@triton.jit
def _out_masked_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    m_ptr,
    y_ptr,
    R,
    N,
    K,
    stride_x,
    stride_w,
    stride_m,
    stride_y,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m < R)[:, None] & (offs_n < N)[None, :]
    kept = tl.load(m_ptr + offs_m[:, None] * stride_m + offs_n[None, :], mask=ok, other=0) != 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.sum(kept.to(tl.int32)) > 0:  # an all-dropped tile does no products
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xv = tl.load(
                x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                mask=(offs_m < R)[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_w + offs_k[None, :],
                mask=(offs_n < N)[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(xv, tl.trans(w), input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(kept, acc, 0.0)
    tl.store(
        y_ptr + offs_m[:, None] * stride_y + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=ok,
    )


def rows_linear(x2, mask, wt, bias):
    """``(mask ⊙ x2) Wᵀ + b`` for (R, K) ``x2``; ``mask`` is (R, K) or (K,) (bool) or None."""
    r, k = x2.shape
    n = wt.shape[1]
    y = x2.new_empty(r, n)
    m = mask.view(torch.uint8) if mask is not None else x2
    stride_m = 0 if mask is None or mask.dim() == 1 else mask.stride(0)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), r)  # noqa: E731
    _rows_kernel[grid](
        x2,
        m,
        wt,
        bias if bias is not None else x2,
        y,
        k,
        n,
        x2.stride(0),
        stride_m,
        wt.stride(0),
        y.stride(0),
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
    )
    return y


def shared_linear(x2, mask, wt, bias):
    """``(mask ⊙ x2) Wᵀ + b`` for (R, K) ``x2`` and a (K,) ``mask`` shared by every row."""
    r, k = x2.shape
    n = wt.shape[1]
    y = torch.zeros(r, n, device=x2.device, dtype=torch.float32)
    m = mask.view(torch.uint8) if mask is not None else x2
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(n, meta["BLOCK_N"]),
        triton.cdiv(r, meta["BLOCK_M"]),
        meta["SPLIT_K"],
    )
    _shared_kernel[grid](
        x2,
        m,
        wt,
        bias if bias is not None else x2,
        y,
        r,
        k,
        n,
        x2.stride(0),
        wt.stride(0),
        y.stride(0),
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
    )
    return y.to(x2.dtype)


def out_masked_linear(x2, weight, bias, out_mask):
    """``M_out ⊙ (x2 Wᵀ + b)`` for (R, K) ``x2`` and an (R, N) bool ``out_mask``."""
    r, k = x2.shape
    n = weight.shape[0]
    y = x2.new_empty(r, n)
    m = out_mask.view(torch.uint8)
    grid = lambda meta: (triton.cdiv(r, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _out_masked_kernel[grid](
        x2,
        weight,
        bias if bias is not None else x2,
        m,
        y,
        r,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        m.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
    )
    return y
