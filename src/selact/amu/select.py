"""From scores to masks: granularity (what is kept together) and budget (how many are kept).

Layouts: ``"linear"`` inputs are (..., K) rows; ``"conv"`` inputs are (B, C, H, W) samples.
Scores are first pooled (mean) into units of the granularity, shaped (U, n): ``n`` units compete
within each of ``U`` rows. Top-k keeps ceil(density · n) of each row; a threshold keeps the units
whose pooled score exceeds it. The mask returned broadcasts to the input.

| granularity  | linear (..., K)                         | conv (B, C, H, W)                       |
|--------------|-----------------------------------------|-----------------------------------------|
| element      | per row, over K                         | per sample, over C·H·W                  |
| block        | G consecutive features, per row         | G consecutive channels at one position  |
| channel      | a feature for all tokens of a sample    | a channel for a whole sample            |
| spatial      | a token (all its features), per sample  | a position (all channels), per sample   |
| batch_shared | one feature mask for all rows           | one channel mask for the whole batch    |
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from selact.mgemm import cpu


@dataclasses.dataclass
class Pooled:
    """Scores pooled into units, and the way back from a (U, n) keep-matrix to an input mask."""

    scores: torch.Tensor  # (U, n)
    expand: Callable[[torch.Tensor], torch.Tensor]


def pool(scores: torch.Tensor, layout: str, granularity: str, block: int = 8) -> Pooled:
    """Pool element scores into the units of ``granularity`` (see the module's table)."""
    key = (layout, granularity)
    if key not in _POOLERS:
        raise ValueError(f"granularity {granularity!r} is not defined for layout {layout!r}")
    return _POOLERS[key](scores, block)


def keep_count(density: float, n: int) -> int:
    """ceil(density · n), robust to float noise (0.35 · 100 is 35, not 36)."""
    return min(n, max(1, math.ceil(round(density * n, 9))))


def topk_keep(pooled: torch.Tensor, density: float) -> torch.Tensor:
    """Bool (U, n) keeping the ceil(density · n) largest scores of each row."""
    n = pooled.shape[-1]
    k = keep_count(density, n)
    if k >= n:
        return torch.ones_like(pooled, dtype=torch.bool)
    if (
        pooled.dtype == torch.float32
        and pooled.device.type == "cpu"
        and pooled.dim() == 2
        and cpu.available()
    ):  # the compiled CPU kernel (ties to the lower index): torch.topk is slow on the CPU
        return cpu.topk_mask(pooled, k)
    index = pooled.topk(k, dim=-1, sorted=False).indices
    keep = torch.zeros_like(pooled, dtype=torch.bool)
    return keep.scatter_(-1, index, True)


def threshold_keep(pooled: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Bool (U, n) keeping the scores above ``threshold``, compared in float32: rounding the
    threshold to a half-precision score dtype would move it across scores."""
    dtype = torch.promote_types(torch.promote_types(pooled.dtype, threshold.dtype), torch.float32)
    return pooled.to(dtype) > threshold.to(dtype)


def _block_mean(s: torch.Tensor, dim: int, g: int) -> torch.Tensor:
    n = s.shape[dim]
    blocks = -(-n // g)
    pad = blocks * g - n
    if pad:
        shape = list(s.shape)
        shape[dim] = pad
        s = torch.cat([s, s.new_zeros(shape)], dim)
    summed = s.unflatten(dim, (blocks, g)).sum(dim + 1)
    counts = torch.full((blocks,), float(g), device=s.device, dtype=summed.dtype)
    counts[-1] = g - pad
    view = [1] * summed.dim()
    view[dim] = blocks
    return summed / counts.view(view)


def _unblock(keep: torch.Tensor, dim: int, g: int, n: int) -> torch.Tensor:
    return keep.repeat_interleave(g, dim).narrow(dim, 0, n)


def _rows(s: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, s.shape[-1])


def _samples(s: torch.Tensor) -> torch.Tensor:
    """(B, T, K): a linear input's samples, with every middle dim flattened into tokens T."""
    if s.dim() == 1:
        return s.reshape(1, 1, -1)
    return s.reshape(s.shape[0], -1, s.shape[-1])


def _linear_element(s, g):
    return Pooled(_rows(s), lambda keep: keep.reshape(s.shape))


def _linear_block(s, g):
    k = s.shape[-1]
    return Pooled(
        _block_mean(_rows(s), 1, g), lambda keep: _unblock(keep, 1, g, k).reshape(s.shape)
    )


def _linear_channel(s, g):
    mask_shape = (*s.shape[:1], *([1] * (s.dim() - 2)), s.shape[-1]) if s.dim() > 1 else s.shape
    return Pooled(_samples(s).mean(1), lambda keep: keep.reshape(mask_shape))


def _linear_spatial(s, g):
    return Pooled(_samples(s).mean(2), lambda keep: keep.reshape(*s.shape[:-1], 1))


def _linear_batch_shared(s, g):
    return Pooled(_rows(s).mean(0, keepdim=True), lambda keep: keep.reshape(s.shape[-1]))


def _conv_element(s, g):
    return Pooled(s.flatten(1), lambda keep: keep.reshape(s.shape))


def _conv_block(s, g):
    b, c, h, w = s.shape
    blocks = _block_mean(s, 1, g)
    return Pooled(blocks.flatten(1), lambda keep: _unblock(keep.reshape(blocks.shape), 1, g, c))


def _conv_channel(s, g):
    b, c = s.shape[:2]
    return Pooled(s.mean((2, 3)), lambda keep: keep.reshape(b, c, 1, 1))


def _conv_spatial(s, g):
    b, _, h, w = s.shape
    return Pooled(s.mean(1).flatten(1), lambda keep: keep.reshape(b, 1, h, w))


def _conv_batch_shared(s, g):
    c = s.shape[1]
    return Pooled(s.mean((0, 2, 3)).unsqueeze(0), lambda keep: keep.reshape(1, c, 1, 1))


_POOLERS = {
    ("linear", "element"): _linear_element,
    ("linear", "block"): _linear_block,
    ("linear", "channel"): _linear_channel,
    ("linear", "spatial"): _linear_spatial,
    ("linear", "batch_shared"): _linear_batch_shared,
    ("conv", "element"): _conv_element,
    ("conv", "block"): _conv_block,
    ("conv", "channel"): _conv_channel,
    ("conv", "spatial"): _conv_spatial,
    ("conv", "batch_shared"): _conv_batch_shared,
}
