"""The ``triton`` backend: sparse-input linear layers and channel-masked convolutions on the GPU
(kernels in triton_kernels.py).

Serves ``linear`` with an input mask (per-row for up to :data:`MAX_ROWS` rows, or shared by all
rows, any batch) or with an output mask alone, and ``conv2d`` with channel or batch-shared masks
(ungrouped, any size, stride, padding and dilation; only when named until it has been timed
against cuDNN on a GPU); float32, float16, bfloat16; inference only. With
``TRITON_INTERPRET=1`` (how CI runs it, on the CPU) it also takes CPU tensors, but only when
asked for by name: the interpreter is far slower than the reference.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch.nn.modules.utils import _pair

from selact.mgemm.counting import conv2d_macs, linear_macs
from selact.mgemm.registry import Backend, Case, register_backend
from selact.mgemm.weights import derived

#: Per-row masks re-read the kept weights once per row, so a batch costs rows x density of the
#: weight reads: measured on an H200 (4096 -> 16384 bf16, density 0.5), 16 rows took 18.6x the
#: dense time. Beyond this many rows a dense GEMM (or a shared mask) wins.
MAX_ROWS = 2
#: Shared masks with at least this many rows use the tiled tl.dot kernel, which reads each kept
#: weight row once per 16-64 rows (rows beyond R padded): the per-row kernel would read it R times.
DOT_ROWS = 2
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    from selact.mgemm import triton_kernels

    return triton_kernels


@functools.cache
def _unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def linear(x, weight, bias=None, *, in_mask=None, out_mask=None, count=True):
    n, k = weight.shape
    rows = x.reshape(-1, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    kernels = _kernels()
    if out_mask is not None:
        mask = out_mask.expand(*x.shape[:-1], n).reshape(-1, n).contiguous()
        y = kernels.out_masked_linear(rows, weight.contiguous(), bias, mask)
    else:
        wt = derived(weight, "transposed", lambda w: w.t().contiguous())
        if in_mask.dim() == 1 and rows.shape[0] >= DOT_ROWS:
            y = kernels.shared_linear(rows, in_mask.contiguous(), wt, bias)
        else:
            mask = in_mask if in_mask.dim() == 1 else in_mask.expand(x.shape).reshape(-1, k)
            y = kernels.rows_linear(rows, mask.contiguous(), wt, bias)
    y = y.reshape(*x.shape[:-1], n)
    if not count:
        return y, None
    kept = x != 0 if in_mask is None else (x != 0) & in_mask
    return y, linear_macs(kept, out_mask, n)


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, in_mask=None, count=True
):
    keep = in_mask.expand(in_mask.shape[0], x.shape[1], 1, 1).reshape(in_mask.shape[0], -1)
    geometry = tuple(_pair(v) for v in (stride, padding, dilation))
    y = _kernels().channel_conv2d(x, keep.contiguous(), weight, bias, *geometry)
    if not count:
        return y, None
    return y, conv2d_macs((x != 0) & in_mask, weight.shape, stride, padding, dilation, groups)


def _check(case: Case) -> str | None:
    if case.op == "conv2d":
        return _check_conv(case)
    in_mask, out_mask = case.shapes["in_mask"], case.shapes["out_mask"]
    if in_mask is None and out_mask is None:
        return "without a mask the dense GEMM is faster"
    if in_mask is not None and out_mask is not None:
        return "it does not combine input and output masks"
    rows = math.prod(case.shapes["x"][:-1])
    shared = in_mask is not None and len(in_mask) == 1
    if in_mask is not None and not shared and rows > MAX_ROWS:
        return f"{rows} rows with per-row masks exceed its {MAX_ROWS}-row limit"
    return _unavailable()


def _check_conv(case: Case) -> str | None:
    mask = case.shapes["in_mask"]
    _, padding, _, groups = case.shapes["params"]
    if groups != (1,) or isinstance(padding, str):
        return "it takes ungrouped convolutions with numeric padding"
    if mask is None:
        return "without a mask the dense convolution is faster"
    if len(mask) != 4 or mask[2:] != (1, 1):
        return "it takes channel or batch-shared masks only"
    return _unavailable()


register_backend(
    Backend(
        name="triton",
        devices=frozenset({"cuda", "cpu"} if INTERPRETING else {"cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        ops={"linear": linear, "conv2d": conv2d},
        priority=20,
        # conv2d on an H100 (docs/kernels.md, 2026-11-27): 0.69-1.22x of dense cuDNN, against
        # 1.18-1.25x for the reference (cuDNN on the masked input): ahead or within 3 %
        auto_devices=frozenset({"cuda"}),
        check=_check,
        differentiable=False,
    )
)
