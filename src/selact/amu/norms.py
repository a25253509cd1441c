"""Per-input weight norms for SAPW: how much weight each input feeds."""

from __future__ import annotations

import torch


def linear_input_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W[:, i]‖₂`` for a (N, K) weight: shape (K,)."""
    return torch.linalg.vector_norm(weight.detach().float(), dim=0)


def conv2d_input_norms(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``‖W[:, c, :, :]‖₂`` per input channel c, over the outputs c feeds: shape (C_in, 1, 1)."""
    out_channels, in_per_group = weight.shape[:2]
    squares = weight.detach().float().pow(2).sum((2, 3))  # (C_out, C_in/groups)
    per_group = squares.reshape(groups, out_channels // groups, in_per_group).sum(1)
    return per_group.reshape(groups * in_per_group, 1, 1).sqrt()
