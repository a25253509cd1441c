"""The ``cpu`` backend: a sparse-input linear kernel that reads only what the mask keeps.

A compiled kernel (csrc/sparse_linear.cpp, AVX-512 where the CPU has it) streams only the weight
rows of the kept nonzero inputs, from a copy of the weight packed once per layer (and again when
the weight changes). float32, inference, batches of up to :data:`MAX_ROWS` rows. It also runs
channel-masked convolutions with small output maps (up to :data:`SMALL_MAP` positions) as an
im2col product, where every output position shares the sample's channel mask.

The kernel is compiled with the machine's C++ compiler on first use (about 30 s, cached by
PyTorch in ``TORCH_EXTENSIONS_DIR``); without a compiler the backend declines every case and the
dispatcher falls back to the reference.
"""

from __future__ import annotations

import functools
import hashlib
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
#: Output positions up to which a channel-masked convolution runs here as an im2col product. At
#: small maps oneDNN is bound by reordering its weights every call, while the packed kernel
#: reads only the kept weights. Measured on this machine (2 threads, batch 1, same run): at 2x2
#: (512 channels, density 0.35) 0.66 of dense here against 1.04 gathered; at 8x8 (256 channels,
#: density 0.5) 1.89 here against 1.10 gathered; 4x4 about even.
SMALL_MAP = 16
_SOURCE = Path(__file__).parent / "csrc" / "sparse_linear.cpp"


@functools.cache
def _build() -> str | None:
    """Compile and load the kernel once; ``None`` on success, else why it is unavailable."""
    try:
        from torch.utils import cpp_extension

        flags = ["-O3", "-march=native", "-fopenmp", f"-DSELACT_NB={TILE}"]
        # A build folder per source version: processes that load different versions at once
        # (an edit while tests run) never share a half-written library.
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()
        cpp_extension.load(
            name=f"selact_cpu_{digest[:12]}",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        torch.library.register_fake("selact_cpu::sparse_linear")(_sparse_linear_fake)
        torch.library.register_fake("selact_cpu::channel_conv")(_channel_conv_fake)
    except Exception as error:  # no compiler, no headers: the backend stays unavailable
        log.warning("selact: the CPU kernel could not be built (%s)", error)
        return f"its kernel could not be built ({type(error).__name__})"
    return None


def _sparse_linear_fake(x, mask, packed, bias, n_out):
    """Shapes of the kernel's results, so that torch.compile can trace around it."""
    return x.new_empty(x.shape[0], n_out), torch.empty((), dtype=torch.long)


def _channel_conv_fake(x, keep, packed, bias, n_out, kh, kw, sh, sw, ph, pw, dh, dw):
    h_out, w_out = _output_size(x.shape[1:], (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    return x.new_empty(n_out, h_out, w_out), torch.empty((), dtype=torch.long)


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


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, in_mask=None, count=True
):
    """A channel-masked convolution on a small output map, as an im2col product on the kernel."""
    b, c = x.shape[:2]
    c_out, _, kh, kw = weight.shape
    packed = derived(weight, "cpu-conv-tiles", lambda w: _pack(w.reshape(c_out, -1)))
    keep = in_mask.expand(in_mask.shape[0], c, 1, 1).reshape(in_mask.shape[0], c).contiguous()
    geometry = (kh, kw, *_pair(stride), *_pair(padding), *_pair(dilation))
    x = x.contiguous()
    results = [
        torch.ops.selact_cpu.channel_conv(
            x[i], keep[i % keep.shape[0]], packed, bias, c_out, *geometry
        )
        for i in range(b)
    ]
    y = torch.stack([r[0] for r in results])
    return y, sum(r[1] for r in results) if count else None


def _output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    s, p, d = (_pair(v) for v in (stride, padding, dilation))
    return tuple((size[i] + 2 * p[i] - d[i] * (kernel[i] - 1) - 1) // s[i] + 1 for i in range(2))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def _check(case: Case) -> str | None:
    if case.op == "conv2d":
        return _check_conv(case)
    if case.shapes["out_mask"] is not None:
        return "it has no output-mask kernel"
    rows = math.prod(case.shapes["x"][:-1])
    if rows > MAX_ROWS:
        return f"{rows} rows exceed its {MAX_ROWS}-row limit"
    return _build()


def _check_conv(case: Case) -> str | None:
    mask, (h, w) = case.shapes["in_mask"], case.shapes["x"][2:]
    stride, padding, dilation, groups = case.shapes["params"]
    if groups != (1,) or isinstance(padding, str):
        return "it takes ungrouped convolutions with numeric padding"
    if mask is None or len(mask) != 4 or mask[2:] != (1, 1):
        return "it takes channel or batch-shared masks only"
    if mask[0] > MAX_ROWS:
        return f"{mask[0]} per-sample masks exceed its {MAX_ROWS}-sample limit"
    kh, kw = case.shapes["weight"][2:]
    h_out, w_out = _output_size((h, w), (kh, kw), stride, padding, dilation)
    if h_out * w_out > SMALL_MAP:
        return f"{h_out}x{w_out} outputs: the gather backend is faster above {SMALL_MAP}"
    return _build()


register_backend(
    Backend(
        name="cpu",
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32}),
        ops={"linear": linear, "conv2d": conv2d},
        priority=10,
        check=_check,
        differentiable=False,
    )
)
