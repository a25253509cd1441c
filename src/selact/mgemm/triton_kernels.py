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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_kernel(
    x_ptr,
    m_ptr,
    wt_ptr,
    b_ptr,
    y_ptr,
    K,
    N,
    stride_x,
    stride_m,
    stride_w,
    stride_y,
    k_split,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = split * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        xv = tl.load(x_ptr + row * stride_x + offs_k, mask=k_ok, other=0.0)
        keep = k_ok & (xv != 0)
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + row * stride_m + offs_k, mask=k_ok, other=0) != 0)
        w = tl.load(
            wt_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
            mask=keep[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(xv.to(tl.float32)[:, None] * w.to(tl.float32), axis=0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(split == 0, bias, 0.0)
    if ATOMIC:
        tl.atomic_add(y_ptr + row * stride_y + offs_n, acc, mask=n_ok)
    else:
        tl.store(y_ptr + row * stride_y + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


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
    k_split,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
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
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ok)
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)


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


def _split(k: int, programs: int, block_k: int, target: int = 528) -> int:
    """K per split so that about ``target`` programs run (4 per SM of a 132-SM H100/H200)."""
    splits = max(1, min(k // (4 * block_k), target // max(programs, 1)))
    per = -(-k // splits)
    return -(-per // block_k) * block_k


def rows_linear(x2, mask, wt, bias, block_k=64, block_n=128, num_warps=4):
    """``(mask ⊙ x2) Wᵀ + b`` for (R, K) ``x2``; ``mask`` is (R, K) or (K,) (bool) or None."""
    r, k = x2.shape
    n = wt.shape[1]
    blocks = triton.cdiv(n, block_n)
    k_split = _split(k, blocks * r, block_k)
    splits = triton.cdiv(k, k_split)
    atomic = splits > 1
    y = torch.zeros(r, n, device=x2.device, dtype=torch.float32) if atomic else x2.new_empty(r, n)
    m = mask.view(torch.uint8) if mask is not None else x2
    stride_m = 0 if mask is None or mask.dim() == 1 else mask.stride(0)
    _rows_kernel[(blocks, r, splits)](
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
        k_split,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        ATOMIC=atomic,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y.to(x2.dtype) if atomic else y


def shared_linear(x2, mask, wt, bias, block_m=16, block_k=64, block_n=128, num_warps=4):
    """``(mask ⊙ x2) Wᵀ + b`` for (R, K) ``x2`` and a (K,) ``mask`` shared by every row."""
    r, k = x2.shape
    n = wt.shape[1]
    grid_nm = triton.cdiv(n, block_n) * triton.cdiv(r, block_m)
    k_split = _split(k, grid_nm, block_k)
    splits = triton.cdiv(k, k_split)
    atomic = splits > 1
    y = torch.zeros(r, n, device=x2.device, dtype=torch.float32) if atomic else x2.new_empty(r, n)
    m = mask.view(torch.uint8) if mask is not None else x2
    _shared_kernel[(triton.cdiv(n, block_n), triton.cdiv(r, block_m), splits)](
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
        k_split,
        HAS_MASK=mask is not None,
        HAS_BIAS=bias is not None,
        ATOMIC=atomic,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y.to(x2.dtype) if atomic else y


def out_masked_linear(x2, weight, bias, out_mask, block_m=32, block_n=64, block_k=32):
    """``M_out ⊙ (x2 Wᵀ + b)`` for (R, K) ``x2`` and an (R, N) bool ``out_mask``."""
    r, k = x2.shape
    n = weight.shape[0]
    y = x2.new_empty(r, n)
    m = out_mask.view(torch.uint8)
    _out_masked_kernel[(triton.cdiv(r, block_m), triton.cdiv(n, block_n))](
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y
