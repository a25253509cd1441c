"""Kernel benchmarks: each MGEMM op against dense PyTorch and the naive routes, on real shapes.

For every case (op, shape, dtype, granularity, density) it times dense PyTorch, every backend that
serves the case, the naive routes (``mask_multiply``: multiply the masked input densely;
``gather``: gather the kept inputs and weight columns, then multiply densely;
``sampled_addmm``: ``torch.sparse.sampled_addmm`` for output masks), and ``dense_kept``: dense
PyTorch on a layer of the kept size (input-masked cases: as many inputs as the mask keeps, their
weights contiguous), what a kernel that reads only the kept weights would take if skipping the
rest cost nothing, fixed costs included. Where the ``cpu`` backend serves, ``cpu_kernel`` times
its kernel called directly, with its arguments prepared beforehand: the difference to ``cpu`` is
what the public op's Python costs. Each route's output is first checked against the reference
backend (the dense routes are baselines, not masked results); a route that disagrees is
reported, not timed. On the GPU, routes are timed as CUDA graph replays where they
can be captured (kernel time, without Python's launch overhead), else eagerly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from selact import mgemm
from selact.amu import keep_count
from selact.bench.timing import graphed, median_ms
from selact.mgemm import cpu

log = logging.getLogger(__name__)

#: Inputs per block of ``block`` granularity cases: 16 float32 weight rows of a 128-output tile
#: are 8 KB, contiguous in the packed layout.
MASK_BLOCK = 16
#: Routes that synchronise with the GPU (``nonzero``), so cannot be captured as CUDA graphs.
SYNCING = frozenset({"gather"})
#: Routes that compute no masked result: dense PyTorch, on the whole layer and on the kept size.
BASELINES = frozenset({"dense", "dense_kept"})
#: Inputs (and masks) each route cycles through: a new mask per call, as in a model.
VARIANTS = 8
TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One benchmark case: ``op`` is ``linear``, ``linear_out`` (output mask) or ``conv2d``."""

    op: str
    batch: int
    size: tuple[int, ...]  # linear: (K, N); conv2d: (C_in, C_out, H, W, kernel, stride)
    dtype: torch.dtype
    granularity: str  # element (per row), batch_shared, channel, block (output tiles)
    density: float

    @property
    def shape(self) -> str:
        if self.op == "conv2d":
            c_in, c_out, h, w, k, s = self.size
            return f"{self.batch}x{c_in}x{h}x{w} k{k} s{s} -> {c_out}"
        return f"{self.batch}x{self.size[0]} -> {self.size[1]}"


def cpu_cases(quick: bool = False) -> list[KernelCase]:
    """The shapes of DESIGN.md section 4 on the CPU: batch 1, float32, densities 1, 0.5, 0.25."""
    densities = (1.0, 0.5, 0.25)
    if quick:
        return [
            KernelCase("linear", 1, (64, 96), torch.float32, "element", 0.5),
            KernelCase("conv2d", 1, (8, 8, 6, 6, 3, 1), torch.float32, "channel", 0.5),
            KernelCase("conv2d", 1, (8, 8, 6, 6, 3, 1), torch.float32, "spatial", 0.5),
            KernelCase("conv2d", 1, (8, 8, 6, 6, 3, 1), torch.float32, "element", 0.5),
        ]
    cases = [
        KernelCase("linear", 1, size, torch.float32, granularity, d)
        for size in ((768, 3072), (4096, 4096))
        for granularity in ("element", "block")
        for d in densities
    ]
    cases += [
        KernelCase("linear", 8, (4096, 4096), torch.float32, g, d)
        for g in ("element", "batch_shared")
        for d in (0.5, 0.25)
    ]
    cases += [
        KernelCase("conv2d", 1, size, torch.float32, "channel", d)
        for size in (
            (64, 64, 32, 32, 3, 1),
            (256, 256, 8, 8, 3, 1),
            (64, 64, 32, 32, 1, 1),
            (64, 128, 32, 32, 3, 2),
        )
        for d in densities
    ]
    cases += [
        KernelCase("conv2d", 1, size, torch.float32, "spatial", d)
        for size in (
            (64, 64, 32, 32, 3, 1),
            (256, 256, 8, 8, 3, 1),
            (64, 64, 32, 32, 1, 1),
            (64, 128, 32, 32, 3, 2),
        )
        for d in (0.5, 0.25)
    ]
    cases += [  # ResNet-20's layers, then the targets' shapes
        KernelCase("conv2d", 1, size, torch.float32, "element", d)
        for size in (
            (16, 16, 32, 32, 3, 1),
            (32, 32, 16, 16, 3, 1),
            (64, 64, 8, 8, 3, 1),
            (16, 32, 32, 32, 3, 2),
            (64, 64, 32, 32, 3, 1),
            (256, 256, 8, 8, 3, 1),
        )
        for d in (0.5, 1 / 3, 0.25)
    ]
    return cases


def gpu_cases(quick: bool = False) -> list[KernelCase]:
    """GEMV 4096 -> 16384 (bf16) and friends on the GPU (DESIGN.md section 4)."""
    if quick:
        return [KernelCase("linear", 1, (64, 96), torch.float16, "element", 0.5)]
    cases = [
        KernelCase("linear", 1, (4096, 16384), dtype, "element", d)
        for dtype in (torch.bfloat16, torch.float16)
        for d in (1.0, 0.5, 0.25)
    ]
    cases += [
        KernelCase("linear", batch, (4096, 16384), torch.bfloat16, "batch_shared", d)
        for batch in (16, 64)
        for d in (1.0, 0.5, 0.25)
    ]
    cases += [KernelCase("linear", 16, (4096, 16384), torch.bfloat16, "element", 0.5)]
    cases += [
        KernelCase("linear_out", 4096, (4096, 4096), torch.bfloat16, "block", d)
        for d in (0.5, 0.25)
    ]
    cases += [
        KernelCase("conv2d", batch, (256, 256, 32, 32, 3, 1), torch.bfloat16, "channel", d)
        for batch in (1, 16)
        for d in (0.5, 0.25)
    ]
    cases += [KernelCase("conv2d", 1, (64, 64, 32, 32, 3, 1), torch.bfloat16, "channel", 0.5)]
    return cases


def run(cases: list[KernelCase], device: str, reps: int, seed: int = 0) -> Iterator[dict]:
    """Time every route of every case; yields one row per (case, route)."""
    for case in cases:
        torch.manual_seed(seed)
        if device == "cuda":  # each case tuned on its own masks: density decides the best tiles
            from selact.mgemm import triton_kernels

            triton_kernels.forget_tuning()
        routes, reference = _routes(case, device)
        ok = {}
        for name, calls in routes.items():
            baseline = name in BASELINES
            error = None if baseline else _check(calls[0](), reference, case.dtype)
            if error:
                log.warning(
                    "%s %s %s: wrong result (%s), not timed", case.op, case.shape, name, error
                )
            else:
                ok[name] = calls
        methods = dict.fromkeys(ok, "wall_clock")
        if device == "cuda":
            ok, methods = graphed(ok, eager=SYNCING)
        times = median_ms(ok, reps, device)
        dense = times["dense"]
        for name, ms in times.items():
            yield {
                "op": case.op,
                "shape": case.shape,
                "dtype": str(case.dtype).removeprefix("torch."),
                "granularity": case.granularity,
                "density": case.density,
                "backend": name,
                "batch": case.batch,
                "threads": torch.get_num_threads(),
                "median_ms": ms,
                "ratio_to_dense": ms / dense,
                "ratio_to_ideal": ms / (case.density * dense),
                "timing": methods[name],
            }


def _check(out, reference, dtype) -> str | None:
    if out.layout == torch.sparse_csr:
        out = out.to_dense()
    scale = reference.float().abs().max().clamp_min(1.0)
    error = float((out.float() - reference.float()).abs().max() / scale)
    return None if error <= TOL[dtype] else f"max error {error:.2e} of the output's range"


def _masks(shape: tuple[int, ...], density: float, device: str, block: int = 1) -> torch.Tensor:
    """Exactly keep_count(density, n / block) kept blocks of ``block`` consecutive entries per
    row of the last dim, at random."""
    *lead, n = shape
    blocks = n // block
    keep = torch.rand(*lead, blocks).topk(keep_count(density, blocks), dim=-1).indices
    mask = torch.zeros(*lead, blocks, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.repeat_interleave(block, dim=-1).to(device)


def _randn(*shape: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # Drawn on the CPU: the CUDA generator must not run while routes are captured as graphs.
    return torch.randn(*shape).to(device, dtype)


def _routes(case: KernelCase, device: str):
    make = {"linear": _linear_routes, "linear_out": _linear_out_routes, "conv2d": _conv_routes}[
        case.op
    ]
    return make(case, device)


def _served(case_of: Callable[[], mgemm.Case], op: Callable, variants) -> dict:
    """Every backend that serves the case, as a route through the public op."""
    names = [n for n in mgemm.BACKENDS.names() if mgemm.why_not(n, case_of()) is None]
    return {name: [lambda v=v, name=name: op(v, name) for v in variants] for name in names}


def _linear_routes(case: KernelCase, device: str):
    k, n = case.size
    w = _randn(n, k, device=device, dtype=case.dtype) / math.sqrt(k)
    b = _randn(n, device=device, dtype=case.dtype)
    shared = case.granularity == "batch_shared"
    variants = []
    block = MASK_BLOCK if case.granularity == "block" else 1
    for _ in range(VARIANTS):
        x = _randn(case.batch, k, device=device, dtype=case.dtype)
        m = _masks((k,) if shared else (case.batch, k), case.density, device, block)
        variants.append((x, m))
    # Every route reads its own copy of the weight (the backends their own layouts): a weight
    # shared by two routes stays in cache for both and flatters them (measured: mask-multiply at
    # 0.62 of dense when it shared the reference backend's 64 MB weight, 4096 -> 4096).
    w_dense = w.clone()
    routes = {"dense": [lambda v=v: F.linear(v[0], w_dense, b) for v in variants]}
    kept = keep_count(case.density, k // block) * block  # every row's
    kept_x = [_randn(case.batch, kept, device=device, dtype=case.dtype) for _ in variants]
    w_kept = w[:, :kept].contiguous()
    routes["dense_kept"] = [lambda x=x: F.linear(x, w_kept, b) for x in kept_x]
    routes |= _served(
        lambda: mgemm.linear_case(*variants[0][:1], w, b, in_mask=variants[0][1]),
        lambda v, name: mgemm.linear(v[0], w, b, in_mask=v[1], count=False, backend=name)[0],
        variants,
    )
    if "cpu" in routes:
        w_kernel = w.clone()  # its own copy (and packed copy), as every route
        routes["cpu_kernel"] = [
            lambda v=v: cpu.KERNELS["linear"](v[0], v[1], w_kernel, b, False)[0] for v in variants
        ]
    w_mask, w_gather = w.clone(), w.clone()  # every route its own weights (see w_dense)
    routes["mask_multiply"] = [lambda v=v: F.linear(v[0] * v[1], w_mask, b) for v in variants]
    if shared or case.batch == 1:
        routes["gather"] = [lambda v=v: _gather_linear(v[0], w_gather, b, v[1]) for v in variants]
    x, m = variants[0]
    reference = mgemm.linear(x, w, b, in_mask=m, backend="reference")[0]
    return routes, reference


def _gather_linear(x, w, b, mask):
    index = mask.reshape(-1, mask.shape[-1])[0].nonzero().squeeze(1)
    return F.linear(x.index_select(-1, index), w.index_select(1, index), b)


def _linear_out_routes(case: KernelCase, device: str):
    k, n = case.size
    w = _randn(n, k, device=device, dtype=case.dtype) / math.sqrt(k)
    tile = (32, 64)  # the Triton kernel's output tile
    variants = []
    for _ in range(VARIANTS):
        x = _randn(case.batch, k, device=device, dtype=case.dtype)
        blocks = _masks((case.batch // tile[0], n // tile[1]), case.density, device)
        m = blocks.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)
        variants.append((x, m, m.to(case.dtype).to_sparse_csr()))
    w_dense = w.clone()  # its own copy, as in _linear_routes
    routes = {"dense": [lambda v=v: F.linear(v[0], w_dense) for v in variants]}
    routes |= _served(
        lambda: mgemm.linear_case(variants[0][0], w, out_mask=variants[0][1]),
        lambda v, name: mgemm.linear(v[0], w, out_mask=v[1], count=False, backend=name)[0],
        variants,
    )
    if device == "cuda" and case.dtype == torch.float32:  # sampled_addmm: float32 CSR only
        routes["sampled_addmm"] = [
            lambda v=v: torch.sparse.sampled_addmm(v[2], v[0], w.t(), beta=0.0) for v in variants
        ]
    x, m, _ = variants[0]
    reference = mgemm.linear(x, w, out_mask=m, backend="reference")[0]
    return routes, reference


def _conv_routes(case: KernelCase, device: str):
    c_in, c_out, h, w_, kernel, stride = case.size
    weight = _randn(c_out, c_in, kernel, kernel, device=device, dtype=case.dtype) * 0.05
    bias = _randn(c_out, device=device, dtype=case.dtype)
    args = (stride, kernel // 2, 1, 1)
    variants = []
    for _ in range(VARIANTS):
        x = _randn(case.batch, c_in, h, w_, device=device, dtype=case.dtype)
        if case.granularity == "element":  # single inputs; channels-last, as in a selective model
            x = x.contiguous(memory_format=torch.channels_last)
            m = _masks((case.batch, h * w_ * c_in), case.density, device)
            m = m.reshape(case.batch, h, w_, c_in).permute(0, 3, 1, 2)
        elif case.granularity == "spatial":  # positions (all their channels)
            m = _masks((case.batch, h * w_), case.density, device).reshape(case.batch, 1, h, w_)
        else:
            m = _masks((case.batch, c_in), case.density, device).reshape(case.batch, c_in, 1, 1)
        variants.append((x, m))
    w_dense = weight.clone()  # its own copy, as in _linear_routes
    # dense PyTorch on the layout a dense model has (the element cases' inputs are channels-last,
    # on which PyTorch's own convolution can take a different, slower route)
    dense_x = [v[0].contiguous() for v in variants]
    routes = {"dense": [lambda x=x: F.conv2d(x, w_dense, bias, *args) for x in dense_x]}
    if case.granularity == "channel":  # a layer of the kept channels (no such layer for positions)
        kept = keep_count(case.density, c_in)
        kept_x = [
            _randn(case.batch, kept, h, w_, device=device, dtype=case.dtype) for _ in variants
        ]
        w_kept = weight[:, :kept].contiguous()
        routes["dense_kept"] = [lambda x=x: F.conv2d(x, w_kept, bias, *args) for x in kept_x]
    routes |= _served(
        lambda: mgemm.conv2d_case(variants[0][0], weight, bias, *args, in_mask=variants[0][1]),
        lambda v, name: mgemm.conv2d(
            v[0], weight, bias, *args, in_mask=v[1], count=False, backend=name
        )[0],
        variants,
    )
    if "cpu" in routes:
        w_kernel = weight.clone()  # its own copy (and packed copy), as every route
        geometry = cpu.conv_geometry(stride, kernel // 2, 1)
        if case.granularity == "spatial":
            routes["cpu_kernel"] = [
                lambda v=v: cpu.KERNELS["spatial_conv"](
                    v[0], v[1], w_kernel, bias, *geometry, False
                )[0]
                for v in variants
            ]
        elif case.granularity == "element":
            routes["cpu_kernel"] = [
                lambda v=v: cpu.KERNELS["element_conv"](
                    v[0], v[1], 0, None, w_kernel, bias, *geometry, False
                )[0]
                for v in variants
            ]
        else:
            routes["cpu_kernel"] = [
                lambda v=v: cpu.KERNELS["conv2d"](
                    v[0], v[1], 0, None, w_kernel, bias, *geometry, False
                )[0]
                for v in variants
            ]
    routes["mask_multiply"] = [
        lambda v=v: F.conv2d(v[0] * v[1], weight, bias, *args) for v in variants
    ]
    x, m = variants[0]
    reference = mgemm.conv2d(x, weight, bias, *args, in_mask=m, backend="reference")[0]
    return routes, reference
