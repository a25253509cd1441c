"""Counting hooks for the layers a conversion leaves dense, so totals cover the whole model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selact.mgemm import conv2d_macs, dense_conv2d_macs, dense_linear_macs, linear_macs
from selact.nn.stats import Counter

_ATTR = "_selact_dense_count"


def attach(module: nn.Module) -> None:
    """Count ``module`` (a dense Conv2d or Linear) as executing all its MACs."""
    if not isinstance(module, nn.Conv2d | nn.Linear) or hasattr(module, _ATTR):
        return
    counter = Counter()
    handle = module.register_forward_hook(
        _count_conv if isinstance(module, nn.Conv2d) else _count_linear
    )
    setattr(module, _ATTR, (counter, handle))


def detach(module: nn.Module) -> None:
    entry = module.__dict__.pop(_ATTR, None)
    if entry is not None:
        entry[1].remove()


def dense_counter(module: nn.Module) -> Counter | None:
    entry = module.__dict__.get(_ATTR)
    return None if entry is None else entry[0]


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
