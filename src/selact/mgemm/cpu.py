"""The ``cpu`` backend: masked linear layers and convolutions that read only what the mask keeps.

Compiled kernels (csrc/sparse_linear.cpp, built for the CPU at hand: AVX-512 or AVX2 with FMA,
else portable loops) read the weights from a copy they pack once per layer (and again when the
weight changes; :func:`packed_weight`): one contiguous row per input, so a dropped input costs no
memory traffic at all. float32, inference:

- linear: per-row masks (up to :data:`MAX_ROWS` rows) as a GEMV per row, more rows as
  one dense GEMM of the masked rows (MKL; no time saved on the product); a mask shared
  by runs of rows (a batch-shared mask, or a token sequence's per-sample mask; up to
  :data:`MAX_ROWS` runs, or any number of runs of :data:`MAX_ROWS` rows or more) as one GEMM
  per run over its kept inputs, the runs side by side when the threads share them evenly;
- conv2d with channel or batch-shared masks (ungrouped, any batch): per sample an implicit GEMM
  over a zero-padded copy of the kept channels, any size, stride, padding and dilation; the
  samples of a batch side by side, one thread each. With spatial masks (any stride): the kept
  positions' inputs times every weight they feed (at stride s, each tap times the positions it
  meets), each product then added where it lands. With element masks (any stride): the kept
  nonzero inputs listed per input position, each list added times its weights into the output
  positions it reaches, the sums held in registers (no im2col, no GEMM). Outputs are in
  channels-last memory format.

The public ops' call signatures that the dispatcher gives this backend are planned in the
kernels (:func:`plan`), which then serve later calls of them without Python (:data:`PLANNED`).

Under ``torch.compile`` the entry points call the kernels as the torch ops
``torch.ops.selact_cpu.*``, whose fake implementations give Dynamo the results' shapes: a
selective model on the fused routes traces into one graph, and Inductor fuses what lies between
the kernels (ResNet-20 at density 0.35, batch 1, 2 threads: 0.78 ms compiled with frozen
weights, 1.19 ms eager, 1.27 ms for the compiled dense model; docs/kernels.md).

The kernels are compiled with the machine's C++ compiler on first use (about 30 s, cached by
PyTorch in ``TORCH_EXTENSIONS_DIR``); without a compiler the backend declines every case and the
dispatcher falls back to the reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.modules.utils import _pair

from selact.mgemm.registry import PLAN_LISTENERS, Backend, Case, register_backend

log = logging.getLogger(__name__)

#: Most masks per linear call: rows with their own masks each re-read their kept weights, so
#: beyond a few one dense GEMM that reads the weight once is faster. (A convolution's samples
#: re-read theirs too, but a convolution's weight is small and its work per weight large.)
MAX_ROWS = 8
#: Packed weight rows are padded to this many floats (one AVX-512 register, two AVX2 ones).
LANES = 16
_SOURCE = Path(__file__).parent / "csrc" / "sparse_linear.cpp"
#: The built kernels (filled by :func:`_build`) as plain Python functions. They are also torch
#: ops (``torch.ops.selact_cpu.*``, with fake implementations for torch.compile), but the
#: backend calls them directly: PyTorch's dispatcher boxes every argument (measured: 2.4 instead
#: of 1.1 us a call warm, 10.9 instead of 4.5 us right after a dense 768 -> 3072 layer has
#: evicted the caches). As functions they return None for the MACs when not counted and for a
#: convolution's mask when it was given (the ops return tensors).
KERNELS: dict[str, Callable] = {}


def _macs(macs: torch.Tensor, count: bool) -> torch.Tensor | None:
    """The MACs an op returned, as the plain kernels give them: None when not counted."""
    return macs if count else None


@functools.cache
def _build() -> str | None:
    """Compile and load the kernel once; ``None`` on success, else why it is unavailable."""
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-march=native", "-fopenmp"]
        # A build folder per source version: processes that load different versions at once
        # (an edit while tests run) never share a half-written library.
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()
        module = cpp_extension.load(
            name=f"selact_cpu_{digest[:12]}",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
        for name, op, fake in (
            ("linear", "sparse_linear", _sparse_linear_fake),
            ("select_linear", "select_linear", _select_linear_fake),
            ("conv2d", "channel_conv", _channel_conv_fake),
            ("spatial_conv", "spatial_conv", _spatial_conv_fake),
            ("element_conv", "element_conv", _element_conv_fake),
            ("topk_mask", "topk_mask", _topk_mask_fake),
        ):
            torch.library.register_fake(f"selact_cpu::{op}")(fake)
            KERNELS[name] = getattr(module, op)
        PACKING.update(packed=module.packed, forget=module.forget_packed, impl_of=module.impl_of)
        module.set_on_packed(_on_packed)
        PLANS.update(plan_linear=module.plan_linear, plan_conv2d=module.plan_conv2d)
        PLANNED.update(linear=module.planned_linear, conv2d=module.planned_conv2d)
        PLAN_LISTENERS.append(module.forget_plans)
    except Exception as error:  # no compiler, no headers: the backend stays unavailable
        log.warning("selact: the CPU kernel could not be built (%s)", error)
        return f"its kernel could not be built ({type(error).__name__})"
    return None


def _sparse_linear_fake(x, mask, weight, bias, count):
    """Shapes of the kernel's results, so that torch.compile can trace around it."""
    return x.new_empty(*x.shape[:-1], weight.shape[0]), torch.empty((), dtype=torch.long)


def _select_linear_fake(x, groups, k, norms, weight, bias, count):
    keep = x.new_empty(groups, x.shape[-1], dtype=torch.bool)
    return x.new_empty(*x.shape[:-1], weight.shape[0]), keep, torch.empty((), dtype=torch.long)


def _topk_mask_fake(scores, k):
    return scores.new_empty(scores.shape, dtype=torch.bool)


def _conv_output_fake(x, weight, sh, sw, ph, pw, dh, dw) -> torch.Tensor:
    """A convolution kernel's output: (B, N, Ho, Wo) in channels-last memory format."""
    h_out, w_out = _output_size(x.shape[2:], weight.shape[2:], (sh, sw), (ph, pw), (dh, dw))
    return torch.empty(
        x.shape[0], weight.shape[0], h_out, w_out, dtype=x.dtype, device=x.device,
        memory_format=torch.channels_last,
    )  # fmt: skip


def _channel_conv_fake(x, keep, k, norms, weight, bias, sh, sw, ph, pw, dh, dw, count):
    y = _conv_output_fake(x, weight, sh, sw, ph, pw, dh, dw)
    samples = x.shape[0] if keep is None else keep.shape[0]
    return y, x.new_empty(samples, x.shape[1], dtype=torch.bool), torch.empty((), dtype=torch.long)


def _spatial_conv_fake(x, mask, weight, bias, sh, sw, ph, pw, dh, dw, count):
    return _conv_output_fake(x, weight, sh, sw, ph, pw, dh, dw), torch.empty((), dtype=torch.long)


def _element_conv_fake(x, mask, k, norms, weight, bias, sh, sw, ph, pw, dh, dw, count):
    y = _conv_output_fake(x, weight, sh, sw, ph, pw, dh, dw)
    return y, x.new_empty(x.shape, dtype=torch.bool), torch.empty((), dtype=torch.long)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W`` as the kernels read it: (K, Np), row ``k`` the weights that input ``k`` feeds
    (for a convolution ``k = c·kh·kw + tap``), the N outputs zero-padded to a multiple of 16; on
    a page boundary, from 2 MB up on a huge-page one. Made once per weight by the kernels
    themselves (a cache in C++, looked up in every kernel call) and made again when the weight
    changes (new storage, an in-place update); released when the weight is freed."""
    return PACKING["packed"](weight)


def _on_packed(weight: torch.Tensor) -> None:
    """Release a weight's packed copy with the weight (the kernels call this for each weight they
    pack)."""
    weakref.finalize(weight, PACKING["forget"], PACKING["impl_of"](weight))


#: The public ops of planned call signatures, served without Python (filled by :func:`_build`):
#: ``PLANNED[op](operands..., count, requested)`` returns the op's results for a call whose
#: signature the dispatcher gave this backend (:func:`plan`), else None.
PLANNED: dict[str, Callable] = {}
PLANS: dict[str, Callable] = {}


def plan(op: str, *operands) -> None:
    """Take over the calls of this call's signature (``Backend.plan``): ``PLANNED[op]`` serves them."""
    PLANS["plan_" + op](*operands)


#: The kernels' packed-weight cache (filled by :func:`_build`): ``packed`` (weight), ``forget``
#: (the address of a weight's TensorImpl), ``impl_of`` (weight: that address).
PACKING: dict[str, Callable] = {}


def linear(x, weight, bias=None, *, in_mask=None, out_mask=None, count=True):
    if torch.compiler.is_compiling():  # traced as the op (its fake gives the shapes)
        y, macs = torch.ops.selact_cpu.sparse_linear(x, in_mask, weight, bias, count)
        return y, _macs(macs, count)
    # x of any leading dims and the mask as given: the kernel reads both in place (shapes in
    # Python cost microseconds a call under a cold cache)
    return KERNELS["linear"](x, in_mask, weight, bias, count)


def select_linear(x, weight, bias, *, groups, keep, norms=None, count=True):
    """The AMU's feature top-k and the linear layer over the kept features, in one kernel call:
    the rows of ``x`` (..., K) come in ``groups`` runs of consecutive rows (a sample's tokens, or
    single rows), each keeping the ``keep`` features of largest mean ``|x|`` over its rows (SAPI),
    times ``norms`` (K,) for SAPW; ties go to the lower feature. The selection of
    :func:`selact.amu.mask` with channel granularity (element for runs of one row) and a top-k
    budget. Returns (y, keep (groups, K) bool, MACs or None)."""
    if torch.compiler.is_compiling():
        y, kept, macs = torch.ops.selact_cpu.select_linear(
            x, groups, keep, norms, weight, bias, count
        )
        return y, kept, _macs(macs, count)
    return KERNELS["select_linear"](x, groups, keep, norms, weight, bias, count)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (U, n): the ``k`` largest of each row of ``scores`` (U, n), float32 on the CPU; NaN
    ranks above every number (as in ``torch.topk``), ties go to the lower index. The AMU's top-k
    on the CPU: ``torch.topk`` takes 80-200 us for 65 rows of 192-384 scores on 2 cores, which
    made a ViT's per-token masks cost more than its layers."""
    if torch.compiler.is_compiling():
        return torch.ops.selact_cpu.topk_mask(scores.detach(), k)
    return KERNELS["topk_mask"](scores.detach(), k)


def mask_groups(mask_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> tuple[int, int]:
    """(G, R): the rows of ``x`` (R of them) come in G runs of consecutive rows that share one
    row of the mask. A (K,) mask: G = 1; per-row masks: G = R; a (B, 1, K) mask on (B, T, K)
    tokens: G = B."""
    lead = x_shape[:-1]
    varying = len(lead) - _shared_tail(mask_shape, x_shape)
    return math.prod(lead[:varying]), math.prod(lead)


def _shared_tail(mask_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> int:
    """How many trailing row dims of ``x`` the mask (broadcast to ``x``) does not change along."""
    lead = len(x_shape) - 1
    mask_lead = (1,) * (lead - len(mask_shape) + 1) + tuple(mask_shape[:-1])
    shared = 0
    while shared < lead and mask_lead[lead - 1 - shared] == 1:
        shared += 1
    return shared


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, in_mask=None, count=True
):
    """A channel-masked convolution as an implicit GEMM over the kept channels, a spatially
    masked one as a GEMM of the kept positions scattered to the outputs, an element-masked one
    as the kept nonzero inputs scattered times their weights (channels-last output)."""
    geometry = conv_geometry(stride, padding, dilation)
    if in_mask is not None and _element(in_mask.shape):
        args = (x, in_mask, 0, None, weight, bias, *geometry, count)
        if torch.compiler.is_compiling():
            y, _, macs = torch.ops.selact_cpu.element_conv(*args)
            return y, _macs(macs, count)
        y, _, macs = KERNELS["element_conv"](*args)
        return y, macs
    if in_mask is not None and _spatial(in_mask.shape):
        args = (x, in_mask, weight, bias, *geometry, count)
        if torch.compiler.is_compiling():
            y, macs = torch.ops.selact_cpu.spatial_conv(*args)
            return y, _macs(macs, count)
        return KERNELS["spatial_conv"](*args)
    if torch.compiler.is_compiling():
        y, _, macs = torch.ops.selact_cpu.channel_conv(
            x, in_mask, 0, None, weight, bias, *geometry, count
        )
        return y, _macs(macs, count)
    y, _, macs = KERNELS["conv2d"](x, in_mask, 0, None, weight, bias, *geometry, count)
    return y, macs


def conv_geometry(stride, padding, dilation) -> tuple[int, ...]:
    """A convolution's settings as the kernel takes them: (sh, sw, ph, pw, dh, dw)."""
    return (*_pair(stride), *_pair(padding), *_pair(dilation))


def select_conv2d(x, weight, bias, geometry, *, keep, norms=None, count=True):
    """The AMU's channel top-k and the convolution over the kept channels, in one kernel call:
    per sample of ``x`` the ``keep`` channels of largest mean ``|x|`` (SAPI), times ``norms``
    (C,) for SAPW; ties go to the lower channel. The selection of :func:`selact.amu.mask` with
    channel granularity and a top-k budget. ``geometry``: :func:`conv_geometry`. Returns
    (y, keep (B, C) bool, MACs or None)."""
    if torch.compiler.is_compiling():
        y, kept, macs = torch.ops.selact_cpu.channel_conv(
            x, None, keep, norms, weight, bias, *geometry, count
        )
        return y, kept, _macs(macs, count)
    return KERNELS["conv2d"](x, None, keep, norms, weight, bias, *geometry, count)


def select_element_conv2d(x, weight, bias, geometry, *, keep, norms=None, count=True):
    """The AMU's element top-k and the convolution over the kept inputs, in one kernel call: per
    sample of ``x`` (B, C, H, W) the ``keep`` inputs of largest ``|x|`` (SAPI), times ``norms``
    (C,) of their channels for SAPW; ties go to the lower index in (C, H, W) order. The selection
    of :func:`selact.amu.mask` with element granularity and a top-k budget. ``geometry``:
    :func:`conv_geometry`. Returns (y, mask (B, C, H, W) bool, MACs or None)."""
    if torch.compiler.is_compiling():
        y, kept, macs = torch.ops.selact_cpu.element_conv(
            x, None, keep, norms, weight, bias, *geometry, count
        )
        return y, kept, _macs(macs, count)
    return KERNELS["element_conv"](x, None, keep, norms, weight, bias, *geometry, count)


def available() -> bool:
    """Whether the kernels are built (or can be): the backend serves nothing otherwise."""
    return _unavailable() is None


@torch.compiler.assume_constant_result
def _unavailable() -> str | None:
    """Why the backend cannot run (:func:`_build`'s answer), or None; a constant to
    torch.compile, which would otherwise trace the build and break the graph at its file read."""
    return _build()


def _output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    s, p, d = (_pair(v) for v in (stride, padding, dilation))
    return tuple((size[i] + 2 * p[i] - d[i] * (kernel[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _check(case: Case) -> str | None:
    if case.op == "conv2d":
        return _check_conv(case)
    if case.shapes["out_mask"] is not None:
        return "it has no output-mask kernel"
    mask, x = case.shapes["in_mask"], case.shapes["x"]
    groups, rows = mask_groups(x if mask is None else mask, x)
    if not serves_runs(groups, rows):
        return (
            f"{groups} mask rows of {rows // groups} input rows each exceed its limit "
            f"({MAX_ROWS} mask rows, or {MAX_ROWS} input rows per mask row)"
        )
    return _unavailable()


def serves_runs(groups: int, rows: int) -> bool:
    """Whether the linear kernel takes ``rows`` in ``groups`` runs that each share a mask: at
    most :data:`MAX_ROWS` runs, runs of at least :data:`MAX_ROWS` rows each, or one mask per row.
    A run re-reads its kept weights; a run of 8 rows or more does enough work per weight read (as a
    dense GEMM does) for its weights, often in L2, not to limit it. More than :data:`MAX_ROWS`
    rows with their own masks go through one dense GEMM of the masked rows (MKL): no time saved
    on the product, but the masks are applied and counted in one call."""
    return groups <= MAX_ROWS or rows >= groups * MAX_ROWS or groups == rows


def _spatial(mask_shape: tuple[int, ...]) -> bool:
    """Whether a convolution's mask keeps positions: (B or 1, 1, H, W), more than one position."""
    return len(mask_shape) == 4 and mask_shape[1] == 1 and mask_shape[2] * mask_shape[3] > 1


def _element(mask_shape: tuple[int, ...]) -> bool:
    """Whether a convolution's mask keeps single inputs: (B or 1, C, H, W), more than one channel
    and more than one position."""
    return len(mask_shape) == 4 and mask_shape[1] > 1 and mask_shape[2] * mask_shape[3] > 1


def _check_conv(case: Case) -> str | None:
    mask, x = case.shapes["in_mask"], case.shapes["x"]
    _, padding, _, groups = case.shapes["params"]
    if groups != (1,) or isinstance(padding, str):
        return "it takes ungrouped convolutions with numeric padding"
    if mask is not None and _element(mask):
        if mask[1:] != x[1:] or mask[0] not in (1, x[0]):
            return "it takes element masks of (B or 1, C, H, W) only"
        return _unavailable()
    if mask is not None and _spatial(mask):
        if mask[2:] != x[2:] or mask[0] not in (1, x[0]):
            return "it takes spatial masks of (B or 1, 1, H, W) only"
        return _unavailable()
    if mask is None or len(mask) != 4 or mask[2:] != (1, 1):
        return "it takes channel, batch-shared, spatial or element masks only"
    return _unavailable()


register_backend(
    Backend(
        name="cpu",
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32}),
        ops={"linear": linear, "conv2d": conv2d},
        priority=10,
        check=_check,
        differentiable=False,
        plan=plan,
    )
)
