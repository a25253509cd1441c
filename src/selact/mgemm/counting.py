"""Exact multiply-accumulate counts (DESIGN.md section 1), as 0-dim int64 tensors on the input's device.

Every count is computed with tensor ops only, so counting never forces a device sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_macs(
    kept: torch.Tensor, out_mask: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """MACs of ``y = (M ⊙ X) Wᵀ`` where ``kept`` (..., K) marks the inputs that are multiplied.

    Each kept input of a row is multiplied by every kept output's weight: the count is
    ``sum_r kept_r * outputs_r``, with ``outputs_r = N`` without an output mask.
    """
    per_row = kept.sum(-1, dtype=torch.int64)
    if out_mask is None:
        return per_row.sum() * out_features
    outputs = out_mask.sum(-1, dtype=torch.int64)
    return (per_row * outputs).sum()


def conv2d_macs(
    kept: torch.Tensor,
    weight_shape: torch.Size | tuple[int, ...],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """MACs of a convolution whose multiplied inputs are ``kept`` (B, C_in, H, W).

    For each output position: the kept inputs in its receptive field (padding does no work) times
    C_out / groups. That is a convolution of ``kept`` with a ones kernel per group.
    """
    out_channels, in_per_group, kh, kw = weight_shape
    ones = torch.ones(groups, in_per_group, kh, kw, device=kept.device, dtype=torch.float32)
    # Each position's count is at most C_in/groups * kh * kw < 2**24: exact in float32.
    per_position = F.conv2d(kept.to(torch.float32), ones, None, stride, padding, dilation, groups)
    return per_position.round().to(torch.int64).sum() * (out_channels // groups)


def dense_linear_macs(input_shape: torch.Size, out_features: int) -> int:
    """R·K·N: the standard count of a linear layer."""
    return math.prod(input_shape) * out_features


def dense_conv2d_macs(
    weight_shape: torch.Size | tuple[int, ...], output_shape: torch.Size | tuple[int, ...]
) -> int:
    """C_out·(C_in/groups)·kh·kw·H_out·W_out per sample, padding included (flop_counter / 2)."""
    batch, _, h_out, w_out = output_shape
    return math.prod(weight_shape) * batch * h_out * w_out
