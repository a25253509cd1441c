"""The ``cpu`` backend: a sparse-input linear kernel that reads only what the mask keeps.

A compiled kernel (csrc/sparse_linear.cpp, AVX-512 where the CPU has it) streams only the weight
rows of the kept nonzero inputs, from a copy of the weight packed once per layer (and again when
the weight changes). float32, inference, batches of up to :data:`MAX_ROWS` rows.

The kernel is compiled with the machine's C++ compiler on first use (about 30 s, cached by
PyTorch in ``TORCH_EXTENSIONS_DIR``); without a compiler the backend declines every case and the
dispatcher falls back to the reference.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import torch

from selact.mgemm.registry import Backend, Case, register_backend
from selact.mgemm.weights import derived

log = logging.getLogger(__name__)

#: Outputs per weight tile of the kernel (SELACT_NB in the C++ source). 128 floats = 512 B per
#: kept input: measured on a 2-core Sapphire Rapids, 4096->4096 at density 0.5, 64 gave 0.64x and
#: 128 gave 0.61x of dense; 256 did not help.
TILE = 128
#: Largest batch the linear kernel takes. Each row re-reads its kept weights, so beyond a few rows
#: one dense GEMM that reads the weight once is faster (crossover measured by `selact bench`).
MAX_ROWS = 8
_SOURCE = Path(__file__).parent / "csrc" / "sparse_linear.cpp"


@functools.cache
def _build() -> str | None:
    """Compile and load the kernel once; ``None`` on success, else why it is unavailable."""
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="selact_cpu",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DSELACT_NB={TILE}"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        torch.library.register_fake("selact_cpu::sparse_linear")(_sparse_linear_fake)
    except Exception as error:  # no compiler, no headers: the backend stays unavailable
        log.warning("selact: the CPU kernel could not be built (%s)", error)
        return f"its kernel could not be built ({type(error).__name__})"
    return None


def _sparse_linear_fake(x, mask, packed, bias, n_out):
    """Shapes of the kernel's results, so that torch.compile can trace around it."""
    return x.new_empty(x.shape[0], n_out), torch.empty((), dtype=torch.long)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W`` as the kernel reads it: (T, K, TILE) with ``[t, k, c] = W[t·TILE + c, k]``."""
    return derived(weight, "cpu-tiles", _pack)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    tiles = math.ceil(n / TILE)
    padded = weight.new_zeros(tiles * TILE, k)
    padded[:n] = weight
    return padded.reshape(tiles, TILE, k).transpose(1, 2).contiguous()


def linear(x, weight, bias=None, *, in_mask=None, out_mask=None, count=True):
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    mask = None
    if in_mask is not None:
        mask = in_mask if in_mask.dim() == 1 else in_mask.expand(x.shape).reshape(-1, k)
        mask = mask.contiguous()
    y, macs = torch.ops.selact_cpu.sparse_linear(rows, mask, packed_weight(weight), bias, n)
    return y.reshape(*x.shape[:-1], n), macs if count else None


def _check(case: Case) -> str | None:
    if case.shapes["out_mask"] is not None:
        return "it has no output-mask kernel"
    rows = math.prod(case.shapes["x"][:-1])
    if rows > MAX_ROWS:
        return f"{rows} rows exceed its {MAX_ROWS}-row limit"
    return _build()


register_backend(
    Backend(
        name="cpu",
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32}),
        ops={"linear": linear},
        priority=10,
        check=_check,
        differentiable=False,
    )
)
