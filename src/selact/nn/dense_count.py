"""Counting hooks for the layers a conversion leaves dense, so totals cover the whole model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selact.mgemm import conv2d_macs, dense_conv2d_macs, dense_linear_macs, linear_macs
from selact.nn.stats import Counter

_ATTR = "_selact_dense_count"


def attach(module: nn.Module) -> None:
    """Count ``module`` (a dense Conv2d, Linear or MultiheadAttention) as executing all its MACs.

    A MultiheadAttention is counted whole (its in- and out-projections): its fused forward reads
    ``out_proj.weight`` without calling ``out_proj``, so that Linear is not counted on its own.
    """
    if hasattr(module, _ATTR):
        return
    if isinstance(module, nn.MultiheadAttention):
        hook = _count_attention
        detach(module.out_proj)
        module.out_proj.__dict__[_ATTR] = None  # counted by the attention module
    elif isinstance(module, nn.Conv2d):
        hook = _count_conv
    elif isinstance(module, nn.Linear):
        hook = _count_linear
    else:
        return
    setattr(module, _ATTR, (Counter(), module.register_forward_hook(hook)))


def detach(module: nn.Module) -> None:
    entry = module.__dict__.pop(_ATTR, None)
    if entry is not None:
        entry[1].remove()
    if isinstance(module, nn.MultiheadAttention):
        module.out_proj.__dict__.pop(_ATTR, None)


def dense_counter(module: nn.Module) -> Counter | None:
    entry = module.__dict__.get(_ATTR)
    return None if entry is None else entry[0]


@torch.no_grad()
def _count_attention(module: nn.MultiheadAttention, args, output) -> None:
    query, key, value = args[:3]
    e = module.embed_dim
    inputs = (query, key, value)
    dense = sum(dense_linear_macs(t.shape, e) for t in inputs)
    zero_skip = sum(linear_macs(t != 0, None, e) for t in inputs)
    out_proj = dense_linear_macs(query.shape, e)  # its input is the attention output: dense
    size = sum(t.numel() for t in inputs)
    dense_counter(module).add(
        query.device,
        dense_macs=dense + out_proj,
        zero_skip_macs=zero_skip + out_proj,
        executed_macs=dense + out_proj,
        kept=size,
        inputs=size,
    )


@torch.no_grad()
def _count_linear(module: nn.Linear, args, output) -> None:
    x = args[0]
    dense = dense_linear_macs(x.shape, module.out_features)
    zero_skip = linear_macs(x != 0, None, module.out_features)
    dense_counter(module).add(
        x.device,
        dense_macs=dense,
        zero_skip_macs=zero_skip,
        executed_macs=dense,
        kept=x.numel(),
        inputs=x.numel(),
    )


@torch.no_grad()
def _count_conv(module: nn.Conv2d, args, output) -> None:
    x = args[0]
    if x.dim() == 3:  # unbatched input
        x, output = x.unsqueeze(0), output.unsqueeze(0)
    dense = dense_conv2d_macs(module.weight.shape, output.shape)
    padding = module.padding
    if module.padding_mode != "zeros":  # padded values are real inputs here
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    zero_skip = conv2d_macs(
        x != 0, module.weight.shape, module.stride, padding, module.dilation, module.groups
    )
    dense_counter(module).add(
        x.device,
        dense_macs=dense,
        zero_skip_macs=zero_skip,
        executed_macs=dense,
        kept=x.numel(),
        inputs=x.numel(),
    )
