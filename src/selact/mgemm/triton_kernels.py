"""Triton kernels of the ``triton`` backend (imported on first use: importing Triton is slow).

- :func:`rows_linear`: ``y = (M ⊙ x) Wᵀ + b`` for a few rows (a GEMV per row). Programs own
  (output block, K split, row); the loads of dropped or zero inputs' weight rows are masked off,
  so their bytes are never read (the idea of TEAL's GEMV, with the mask given instead of a
  threshold). The K split gives the GPU enough loads in flight to reach its memory bandwidth: one
  program per output block walking all of K is latency-bound (measured on an H200: 1.9 TB/s at
  density 1.0, hardly faster at 0.5).
- :func:`shared_linear`: the same for a mask shared by all rows, as a tiled ``tl.dot`` product
  that reads each kept weight row once per block of rows.
- :func:`out_masked_linear`: ``y = M_out ⊙ (x Wᵀ + b)``; tiles whose mask is all zero skip their
  products.
- :func:`channel_conv2d`: a convolution over each sample's kept input channels (channel or
  batch-shared masks) as an implicit GEMM: (output positions x outputs) tiles, walking the listed
  kept channels tap by tap with ``tl.dot``; no im2col, no gathered copy of the input or the
  weights, and no host sync (the gather route's ``nonzero`` waits for the GPU).

Both input-masked products also have a *listed* form: :func:`_kept_rows_kernel` first writes the
indices of the kept inputs (a prefix sum of the mask), and the product then walks that list, so
its number of steps falls with the density instead of covering every input (on an H100 the
walking GEMV's time was 24 µs + 30 µs x density: the fixed part is the walk). Which form runs is
the tuner's choice.

Weights are read as ``Wᵀ`` (K, N), contiguous, so that a kept input's weights are one row. The
inputs and mask of the next K block are loaded before the weights of the current one, so that the
weight loads never wait for the mask. Accumulation is float32; with a K split, each split writes
its partial sums to a float32 buffer, and either :func:`_sum_splits_kernel` adds them or, with
``fused_sum``, the split of each tile that finishes last does (an atomic count tells it: no second
kernel), both in a fixed order (results do not depend on timing). Tile sizes and the K split
are chosen per shape on the GPU by timing the candidates (:func:`_pick`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from selact.mgemm.weights import derived

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch configuration: tile sizes, the K split, warps and pipeline stages."""

    block_n: int
    block_k: int
    split_k: int = 1
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 2
    ahead: bool = False  # GEMV: load the next block's weights before using the current one's
    compact: bool = False  # list the kept rows first (_kept_rows_kernel), then walk that list
    fused_sum: bool = False  # K split: the last split of each tile adds the partial sums


#: Candidates per kernel, the first being the interpreter's (and SELACT_TRITON_AUTOTUNE=0's).
#: GEMV: small output blocks and K splits give parallelism; 4-32 KB of weights per step.
ROWS_TILES = [
    Tiles(64, 64, 1),
    *(Tiles(n, k, s, num_warps=w) for n, k, s, w in [
        (32, 128, 1, 4), (64, 128, 1, 8), (128, 64, 1, 8), (32, 64, 1, 4),
        (64, 64, 2, 4), (64, 128, 2, 8), (128, 64, 2, 4), (128, 128, 2, 8),
        (64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 4, 8), (256, 32, 4, 4),
        (64, 32, 8, 4), (128, 32, 8, 4), (256, 64, 8, 8),
    ]),
    *(Tiles(n, k, s, num_warps=w, num_stages=st, ahead=a) for n, k, s, w, st, a in [
        (32, 128, 1, 4, 3, False), (32, 128, 1, 4, 4, False), (64, 128, 1, 8, 3, False),
        (32, 128, 1, 4, 2, True), (32, 64, 1, 4, 2, True), (64, 64, 1, 4, 2, True),
        (64, 128, 1, 8, 2, True), (32, 128, 2, 4, 2, True), (64, 64, 2, 4, 2, True),
        (128, 64, 2, 8, 2, True), (64, 64, 4, 4, 2, True),
    ]),
    *(Tiles(n, k, s, num_warps=w, num_stages=st, compact=True) for n, k, s, w, st in [
        (32, 128, 1, 4, 3), (32, 64, 1, 4, 3), (64, 64, 1, 4, 3), (64, 128, 1, 8, 3),
        (32, 64, 2, 4, 3), (64, 64, 2, 4, 3), (128, 64, 4, 4, 3),
    ]),
    # wide output blocks (whole 256-2048-byte runs of each weight row) and deep K splits, the
    # partial sums added by each tile's last split: short walks, many bytes in flight, no second
    # kernel
    *(Tiles(n, k, s, num_warps=w, num_stages=3, compact=c, fused_sum=True)
      for n, k, s, w, c in [
        (128, 64, 8, 4, False), (128, 32, 16, 4, False), (256, 32, 8, 4, False),
        (256, 32, 16, 4, False), (256, 64, 4, 8, False), (512, 16, 16, 4, False),
        (512, 16, 16, 8, False), (512, 32, 8, 8, False), (1024, 16, 16, 8, False),
        (1024, 8, 32, 8, False), (128, 64, 4, 4, True), (256, 16, 16, 4, True),
        (256, 32, 8, 4, True), (512, 16, 16, 8, True),
    ]),
]  # fmt: skip
#: Shared-mask GEMM: one block of rows for up to 64 rows (each block re-reads the kept weights).
SHARED_TILES = [
    Tiles(64, 64, 1, block_m=16),
    *(Tiles(n, k, s, block_m=m, num_warps=w, num_stages=st) for m, n, k, s, w, st in [
        (16, 128, 64, 1, 4, 3), (16, 64, 64, 2, 4, 3), (16, 128, 64, 2, 4, 3),
        (16, 64, 128, 4, 4, 3), (16, 128, 64, 4, 8, 3), (16, 256, 64, 4, 8, 3),
        (32, 128, 64, 2, 4, 3), (32, 128, 64, 4, 8, 3), (64, 128, 64, 1, 8, 3),
        (64, 128, 64, 2, 8, 3), (64, 64, 64, 4, 4, 3), (64, 256, 64, 2, 8, 3),
    ]),
    *(Tiles(n, k, s, block_m=m, num_warps=w, num_stages=3, compact=True) for m, n, k, s, w in [
        (16, 128, 64, 1, 4), (16, 256, 64, 4, 8), (16, 128, 64, 2, 4), (64, 128, 64, 2, 8),
        (64, 128, 64, 1, 8),
    ]),
    *(Tiles(n, k, s, block_m=m, num_warps=w, num_stages=3, compact=c, fused_sum=True)
      for m, n, k, s, w, c in [
        (16, 128, 64, 4, 4, False), (16, 128, 64, 8, 4, False), (16, 256, 64, 8, 8, False),
        (16, 256, 32, 16, 8, False), (16, 512, 32, 8, 8, False), (64, 128, 64, 4, 8, False),
        (16, 128, 64, 4, 4, True), (16, 256, 64, 8, 8, True),
    ]),
]  # fmt: skip
#: Output-masked GEMM tiles.
OUT_TILES = [
    Tiles(64, 32, block_m=32),
    *(Tiles(n, k, block_m=m, num_warps=w, num_stages=3) for m, n, k, w in [
        (64, 64, 32, 4), (64, 128, 64, 4), (128, 128, 32, 8), (128, 64, 64, 4), (128, 128, 64, 8),
    ]),
]  # fmt: skip

#: Channel-masked convolution tiles: block_m output positions x block_n outputs, block_k kept
#: channels per step (each tap in turn).
CONV_TILES = [
    Tiles(32, 16, block_m=32),
    *(Tiles(n, k, block_m=m, num_warps=w, num_stages=st) for m, n, k, w, st in [
        (32, 32, 32, 4, 2), (32, 64, 32, 4, 3), (64, 32, 32, 4, 3), (64, 64, 32, 4, 3),
        (64, 64, 64, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
        (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
    ]),
]  # fmt: skip

_CHOSEN: dict[tuple, Tiles] = {}


def _pick(key: tuple, candidates: list[Tiles], launch: Callable[[Tiles], object]) -> Tiles:
    """The fastest of ``candidates`` for ``key`` (shape, dtype, kernel), timed once per key with
    ``triton.testing.do_bench`` (cold L2, as the benchmark measures) and remembered; the first
    candidate in the interpreter or with ``SELACT_TRITON_AUTOTUNE=0``. Candidates that do not fit
    the GPU (shared memory, registers) are passed over, with a warning."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    if INTERPRETING or os.environ.get("SELACT_TRITON_AUTOTUNE") == "0":
        choice = candidates[0]
    else:
        timed = []
        for tiles in candidates:
            try:
                ms = triton.testing.do_bench(lambda t=tiles: launch(t), warmup=10, rep=40)
            except Exception as error:  # noqa: BLE001 - a candidate this GPU cannot run
                log.warning(
                    "triton %s: candidate %s failed (%s); passed over", key[0], tiles, error
                )
                continue
            timed.append((ms, tiles))
        if not timed:
            raise RuntimeError(f"triton {key[0]}: no candidate tile configuration ran on this GPU")
        choice = min(timed, key=lambda pair: pair[0])[1]
        log.info("triton %s %s: chose %s", key[0], key[1:], choice)
    _CHOSEN[key] = choice
    return choice


def forget_tuning() -> None:
    """Forget every tile choice: the next call of each shape is timed again, on its own masks
    (the benchmark tunes each density case afresh, as each model is tuned on its first call)."""
    _CHOSEN.clear()


def _launch_options(tiles: Tiles) -> dict[str, int]:
    return {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}


@triton.jit
def _store(
    y_ptr, p_ptr, lock_ptr, b_ptr, acc, offsets, ok, offs_n, n_ok, split, stride_s,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FUSED_SUM: tl.constexpr,
):  # fmt: skip
    """The input-masked kernels' output: ``acc`` (+ bias) in the output's dtype, or, with a K
    split, float32 partial sums at ``split`` in ``p``. These are added by :func:`_sum_splits_kernel`
    or, FUSED_SUM, by whichever split of the tile finishes last (its count at ``lock_ptr`` tells
    it), in the same fixed order, with no second kernel; that split sets the count back to 0."""
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(p_ptr + split * stride_s + offsets, acc, mask=ok)
        if FUSED_SUM:
            tl.debug_barrier()  # every thread's partial sums stored before the count rises
            if tl.atomic_add(lock_ptr, 1, sem="acq_rel") == SPLIT_K - 1:
                out = tl.zeros_like(acc)
                for other in tl.static_range(SPLIT_K):  # from L2: other SMs wrote them
                    ptrs = p_ptr + other * stride_s + offsets
                    out += tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(lock_ptr, 0)


@triton.jit
def _row_block(x_row, m_row, idx_row, offs, end, HAS_MASK: tl.constexpr, LISTED: tl.constexpr):
    """One block of a GEMV's walk, at positions ``offs`` (< ``end``): (input indices, their
    values, which to use). The walk covers every input (kept: mask set, value nonzero) or, LISTED,
    the kept inputs listed in ``idx_row`` by :func:`_kept_rows_kernel`."""
    ok = offs < end
    if LISTED:
        ks = tl.load(idx_row + offs, mask=ok, other=0)
        xv = tl.load(x_row + ks, mask=ok, other=0.0)
        keep = ok
    else:
        ks = offs
        xv = tl.load(x_row + offs, mask=ok, other=0.0)
        keep = ok & (xv != 0)
        if HAS_MASK:
            keep = keep & (tl.load(m_row + offs, mask=ok, other=0) != 0)
    return ks, xv, keep


@triton.jit
def _shared_block(m_ptr, idx_ptr, offs, end, HAS_MASK: tl.constexpr, LISTED: tl.constexpr):
    """One block of the shared-mask GEMM's walk: (input indices, which to use), over every
    input (kept: mask set) or, LISTED, over the kept inputs listed in ``idx_ptr``."""
    ok = offs < end
    if LISTED:
        ks = tl.load(idx_ptr + offs, mask=ok, other=0)
        keep = ok
    else:
        ks = offs
        keep = ok
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + offs, mask=ok, other=0) != 0)
    return ks, keep


@triton.jit
def _walk_range(count_ptr, K, split, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
                LISTED: tl.constexpr):  # fmt: skip
    """This K split's part [begin, end) of the walk: over K inputs, or over the ``count`` listed."""
    if LISTED:
        total = tl.load(count_ptr)
    else:
        total = K
    per_split = tl.cdiv(tl.cdiv(total, SPLIT_K), BLOCK_K) * BLOCK_K
    begin = split * per_split
    return begin, tl.minimum(begin + per_split, total)


@triton.jit
def _rows_kernel(
    x_ptr, m_ptr, idx_ptr, count_ptr, wt_ptr, b_ptr, y_ptr, p_ptr, lock_ptr, K, N, stride_x,
    stride_m, stride_w, stride_y, stride_s, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, AHEAD: tl.constexpr,
    LISTED: tl.constexpr, FUSED_SUM: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    begin, end = _walk_range(count_ptr + row, K, split, SPLIT_K, BLOCK_K, LISTED)
    x_row = x_ptr + row * stride_x
    m_row = m_ptr + row * stride_m
    idx_row = idx_ptr + row * K
    # A (BLOCK_K, BLOCK_N) accumulator, reduced over K once at the end: a reduction across
    # threads in every step would cost more than the loads it waits for.
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    offs = begin + tl.arange(0, BLOCK_K)
    ks, xv, keep = _row_block(x_row, m_row, idx_row, offs, end, HAS_MASK, LISTED)
    w_ptrs = wt_ptr + offs_n[None, :]
    if AHEAD:  # the first block's weights before the loop; each step then loads the next one's
        w = tl.load(w_ptrs + ks[:, None] * stride_w, mask=keep[:, None] & n_ok[None, :], other=0.0)
    for _ in range(begin, end, BLOCK_K):
        # the next block's indices and inputs, loaded while the weights are on their way
        offs += BLOCK_K
        ks_next, x_next, keep_next = _row_block(x_row, m_row, idx_row, offs, end, HAS_MASK, LISTED)
        # the rows of dropped or zero inputs are never read
        if AHEAD:  # two blocks of weights in flight
            w_next = tl.load(
                w_ptrs + ks_next[:, None] * stride_w,
                mask=keep_next[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc += xv.to(tl.float32)[:, None] * w.to(tl.float32)
            w = w_next
        else:
            w_now = tl.load(
                w_ptrs + ks[:, None] * stride_w, mask=keep[:, None] & n_ok[None, :], other=0.0
            )
            acc += xv.to(tl.float32)[:, None] * w_now.to(tl.float32)
        ks = ks_next
        xv = x_next
        keep = keep_next
    out = tl.sum(acc, axis=0)
    lock = lock_ptr + row * tl.num_programs(0) + pid_n
    _store(y_ptr, p_ptr, lock, b_ptr, out, row * stride_y + offs_n, n_ok, offs_n, n_ok, split,
           stride_s, HAS_BIAS, SPLIT_K, FUSED_SUM)  # fmt: skip


@triton.jit
def _shared_kernel(
    x_ptr, m_ptr, idx_ptr, count_ptr, wt_ptr, b_ptr, y_ptr, p_ptr, lock_ptr, R, K, N, stride_x,
    stride_w, stride_y, stride_s, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    LISTED: tl.constexpr, FUSED_SUM: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < R
    n_ok = offs_n < N
    begin, end = _walk_range(count_ptr, K, split, SPLIT_K, BLOCK_K, LISTED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs = begin + tl.arange(0, BLOCK_K)
    ks, keep = _shared_block(m_ptr, idx_ptr, offs, end, HAS_MASK, LISTED)
    for _ in range(begin, end, BLOCK_K):
        xv = tl.load(
            x_ptr + offs_m[:, None] * stride_x + ks[None, :],
            mask=m_ok[:, None] & keep[None, :],
            other=0.0,
        )
        w = tl.load(
            wt_ptr + ks[:, None] * stride_w + offs_n[None, :],
            mask=keep[:, None] & n_ok[None, :],
            other=0.0,
        )
        offs += BLOCK_K  # the next block's indices, loaded while the weights are on their way
        ks_next, keep_next = _shared_block(m_ptr, idx_ptr, offs, end, HAS_MASK, LISTED)
        acc += tl.dot(xv, w, input_precision="ieee")
        ks = ks_next
        keep = keep_next
    ptrs = offs_m[:, None] * stride_y + offs_n[None, :]
    lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
    _store(y_ptr, p_ptr, lock, b_ptr, acc, ptrs, m_ok[:, None] & n_ok[None, :], offs_n, n_ok,
           split, stride_s, HAS_BIAS, SPLIT_K, FUSED_SUM)  # fmt: skip


@triton.jit
def _kept_rows_kernel(
    x_ptr, m_ptr, idx_ptr, count_ptr, K, stride_x, stride_m, HAS_MASK: tl.constexpr,
    SKIP_ZEROS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per mask row: the indices of its kept inputs (mask set and, with SKIP_ZEROS, input
    nonzero), in order, into ``idx`` (R, K), and their number into ``count`` (R,)."""
    row = tl.program_id(0)
    total = tl.zeros((1,), dtype=tl.int32)  # kept so far (a 1-element tensor: loop-carried)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        keep = offs < K
        if SKIP_ZEROS:
            keep = keep & (tl.load(x_ptr + row * stride_x + offs, mask=keep, other=0.0) != 0)
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + row * stride_m + offs, mask=keep, other=0) != 0)
        flags = keep.to(tl.int32)
        slots = total + tl.cumsum(flags, 0) - 1
        tl.store(idx_ptr + row * K + slots, offs, mask=keep)
        total += tl.sum(flags, 0)
    tl.store(count_ptr + row + tl.arange(0, 1), total)


@triton.jit
def _sum_splits_kernel(
    p_ptr, b_ptr, y_ptr, total, N, stride_s, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """``y = sum over splits of p + b`` for float32 partial sums ``p`` (SPLIT_K, R*N)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    out = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        out += tl.load(p_ptr + split * stride_s + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _out_masked_kernel(
    x_ptr, w_ptr, b_ptr, m_ptr, y_ptr, R, N, K, stride_x, stride_w, stride_m, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
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


@triton.jit
def _channel_conv_kernel(
    x_ptr, idx_ptr, count_ptr, wt_ptr, b_ptr, y_ptr, C, H, W, N, Ho, Wo, stride_xb, stride_xc,
    stride_xh, stride_xw, stride_yb, stride_yn, stride_yh, stride_yw, PER_SAMPLE: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
    DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (positions, outputs) tile of sample ``b``: the sum over taps and over the listed kept
    channels (``idx`` row ``b``, or row 0 for a shared mask) of input tile times weight tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < Ho * Wo
    n_ok = offs_n < N
    oy = offs_m // Wo
    ox = offs_m % Wo
    row = b * PER_SAMPLE
    idx_row = idx_ptr + row * C
    count = tl.load(count_ptr + row)
    x_sample = x_ptr + b * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        iy = oy * SH - PH + (tap // KW) * DH
        ix = ox * SW - PW + (tap % KW) * DW
        at = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # padding reads nothing
        x_at = x_sample + iy * stride_xh + ix * stride_xw
        w_tap = wt_ptr + tap * C * N + offs_n[None, :]
        for c0 in range(0, count, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < count
            cs = tl.load(idx_row + offs_c, mask=c_ok, other=0)
            xv = tl.load(
                x_at[:, None] + cs[None, :] * stride_xc, mask=at[:, None] & c_ok[None, :], other=0.0
            )
            w = tl.load(w_tap + cs[:, None] * N, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(xv, w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ptrs = (
        y_ptr
        + b * stride_yb
        + (oy * stride_yh + ox * stride_yw)[:, None]
        + offs_n[None, :] * stride_yn
    )
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _outputs(x2: torch.Tensor, r: int, n: int, tiles: Tiles, tiles_count: int):
    """(y, float32 partial sums, tile counts) for a launch: the last two only with a K split,
    the counts only for its fused sums (the kernels take ``y`` for what they do not use)."""
    y = x2.new_empty(r, n)
    if tiles.split_k == 1:
        return y, y, y
    partial = torch.empty(tiles.split_k, r, n, device=x2.device, dtype=torch.float32)
    counts = _tile_counts(x2.device, tiles_count) if tiles.fused_sum else partial
    return y, partial, counts


_COUNTS: dict[tuple, torch.Tensor] = {}


def _tile_counts(device: torch.device, size: int) -> torch.Tensor:
    """At least ``size`` zeroed int32 counts for the fused K-split sums. One buffer per device and
    stream, kept between calls with no memset: each tile's last split sets its count back to 0,
    and kernels on one stream run one after another."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    counts = _COUNTS.get(key)
    if counts is None or counts.numel() < size:
        counts = torch.zeros(max(size, 4096), device=device, dtype=torch.int32)
        _COUNTS[key] = counts
    return counts


def _sum_splits(partial: torch.Tensor, bias, y: torch.Tensor, tiles: Tiles) -> None:
    """The partial sums of a K split added by a second kernel (unless the splits fused them)."""
    if tiles.split_k == 1 or tiles.fused_sum:
        return
    block = 1024
    total = y.numel()
    _sum_splits_kernel[(triton.cdiv(total, block),)](
        partial,
        bias if bias is not None else y,
        y,
        total,
        y.shape[1],
        partial.stride(0),
        HAS_BIAS=bias is not None,
        SPLIT_K=tiles.split_k,
        BLOCK=block,
    )


def _kept_rows(x2, m, rows: int, stride_m: int, has_mask: bool, skip_zeros: bool):
    """(idx (rows, K) int32, count (rows,) int32): each mask row's kept inputs, listed."""
    k = x2.shape[1]
    idx = torch.empty(rows, k, device=x2.device, dtype=torch.int32)
    count = torch.empty(rows, device=x2.device, dtype=torch.int32)
    _kept_rows_kernel[(rows,)](
        x2, m, idx, count, k, x2.stride(0), stride_m, HAS_MASK=has_mask, SKIP_ZEROS=skip_zeros,
        BLOCK=min(4096, triton.next_power_of_2(k)),
    )  # fmt: skip
    return idx, count


def _key(name: str, x2: torch.Tensor, wt: torch.Tensor, *flags: object) -> tuple:
    return (name, x2.device.index, x2.dtype, *x2.shape, *wt.shape, *flags)


def rows_linear(x2, mask, wt, bias):
    """``(mask ⊙ x2) Wᵀ + b`` for (R, K) ``x2``; ``mask`` is (R, K) or (K,) (bool) or None."""
    r, k = x2.shape
    n = wt.shape[1]
    m = mask.view(torch.uint8) if mask is not None else x2
    stride_m = 0 if mask is None or mask.dim() == 1 else mask.stride(0)

    def launch(tiles: Tiles) -> torch.Tensor:
        grid = (triton.cdiv(n, tiles.block_n), tiles.split_k, r)
        y, partial, counts = _outputs(x2, r, n, tiles, grid[0] * r)
        stride_s = partial.stride(0) if tiles.split_k > 1 else 0
        idx = count = x2  # unused unless listed
        if tiles.compact:
            idx, count = _kept_rows(x2, m, r, stride_m, mask is not None, skip_zeros=True)
        _rows_kernel[grid](
            x2, m, idx, count, wt, bias if bias is not None else x2, y, partial, counts, k, n,
            x2.stride(0), stride_m, wt.stride(0), n, stride_s,
            HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
            BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n, SPLIT_K=tiles.split_k,
            AHEAD=tiles.ahead, LISTED=tiles.compact, FUSED_SUM=tiles.fused_sum,
            **_launch_options(tiles),
        )  # fmt: skip
        _sum_splits(partial, bias, y, tiles)
        return y

    return launch(_pick(_key("rows", x2, wt, mask is not None), ROWS_TILES, launch))


def shared_linear(x2, mask, wt, bias):
    """``(mask ⊙ x2) Wᵀ + b`` for (R, K) ``x2`` and a (K,) ``mask`` shared by every row."""
    r, k = x2.shape
    n = wt.shape[1]
    m = mask.view(torch.uint8) if mask is not None else x2
    candidates = [t for t in SHARED_TILES if t.block_m <= max(16, triton.next_power_of_2(r))]

    def launch(tiles: Tiles) -> torch.Tensor:
        grid = (triton.cdiv(n, tiles.block_n), tiles.split_k, triton.cdiv(r, tiles.block_m))
        y, partial, counts = _outputs(x2, r, n, tiles, grid[0] * grid[2])
        stride_s = partial.stride(0) if tiles.split_k > 1 else 0
        idx = count = x2  # unused unless listed
        if tiles.compact:
            idx, count = _kept_rows(x2, m, 1, 0, mask is not None, skip_zeros=False)
        _shared_kernel[grid](
            x2, m, idx, count, wt, bias if bias is not None else x2, y, partial, counts, r, k, n,
            x2.stride(0), wt.stride(0), n, stride_s,
            HAS_MASK=mask is not None, HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
            BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n, SPLIT_K=tiles.split_k,
            LISTED=tiles.compact, FUSED_SUM=tiles.fused_sum, **_launch_options(tiles),
        )  # fmt: skip
        _sum_splits(partial, bias, y, tiles)
        return y

    return launch(_pick(_key("shared", x2, wt, mask is not None), candidates, launch))


def out_masked_linear(x2, weight, bias, out_mask):
    """``M_out ⊙ (x2 Wᵀ + b)`` for (R, K) ``x2`` and an (R, N) bool ``out_mask``."""
    r, k = x2.shape
    n = weight.shape[0]
    m = out_mask.view(torch.uint8)

    def launch(tiles: Tiles) -> torch.Tensor:
        y = x2.new_empty(r, n)
        grid = (triton.cdiv(r, tiles.block_m), triton.cdiv(n, tiles.block_n))
        _out_masked_kernel[grid](
            x2, weight, bias if bias is not None else x2, m, y, r, n, k,
            x2.stride(0), weight.stride(0), m.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k, **_launch_options(tiles),
        )  # fmt: skip
        return y

    return launch(_pick(_key("out", x2, weight), OUT_TILES, launch))


def channel_conv2d(x, keep, weight, bias, stride, padding, dilation):
    """The convolution of ``x`` (B, C, H, W) over each sample's kept channels: ``keep`` (B, C) or
    (1, C) bool (one mask for every sample). ``stride``, ``padding``, ``dilation``: pairs. The
    output has ``x``'s memory format (contiguous or channels-last)."""
    batch, c, h, w_ = x.shape
    n, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    # (taps * C, N): the weights of tap t and channel c in row t * C + c, contiguous over N
    wt = derived(
        weight, "taps_channels_outputs", lambda v: v.permute(2, 3, 1, 0).reshape(-1, n).contiguous()
    )
    m = keep.view(torch.uint8)
    idx, count = _kept_rows(m, m, m.shape[0], m.stride(0), has_mask=True, skip_zeros=False)
    y = torch.empty(
        batch, n, ho, wo, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
    )

    def launch(tiles: Tiles) -> torch.Tensor:
        grid = (triton.cdiv(ho * wo, tiles.block_m), triton.cdiv(n, tiles.block_n), batch)
        _channel_conv_kernel[grid](
            x, idx, count, wt, bias if bias is not None else x, y, c, h, w_, n, ho, wo,
            *x.stride(), *y.stride(), PER_SAMPLE=int(keep.shape[0] > 1),
            SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, KH=kh, KW=kw, HAS_BIAS=bias is not None,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            **_launch_options(tiles),
        )  # fmt: skip
        return y

    key = ("conv", x.device.index, x.dtype, *x.shape, *weight.shape, stride, padding, dilation)
    return launch(_pick((*key, keep.shape[0] > 1), CONV_TILES, launch))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
