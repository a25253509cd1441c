"""An independent MAC count: masks from the AMU, products counted from unfolded kept inputs,
dense MACs from torch's flop counter on an unconverted copy of the architecture."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import selact


def independent_fraction(model: nn.Module, batches, dense_model: nn.Module) -> float:
    """Executed/dense MACs counted without selact's counters: masks from the AMU, products
    counted from unfolded kept inputs; dense MACs from torch's flop counter."""
    executed = 0

    def conv_hook(module, args):
        nonlocal executed
        x = args[0]
        mask = selact.amu.mask(x, module.weight, module.config, layout="conv")
        kept = (x != 0) if mask is None else (x != 0) & mask.expand_as(x)
        cols = F.unfold(kept.float(), module.kernel_size, module.dilation, module.padding,
                        module.stride)  # fmt: skip
        executed += int(cols.sum()) * (module.out_channels // module.groups)

    def linear_hook(module, args):
        nonlocal executed
        x = args[0]
        mask = selact.amu.mask(x, module.weight, module.config, layout="linear")
        kept = (x != 0) if mask is None else (x != 0) & mask.expand_as(x)
        executed += int(kept.sum()) * module.out_features

    def dense_hook(module, args, output):  # a layer left dense executes all its products
        nonlocal executed
        if isinstance(module, nn.Conv2d):
            per_output = module.weight[0].numel()  # C_in/groups * kh * kw
            executed += output.numel() * per_output
        else:
            executed += output.numel() * module.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, selact.SelectiveConv2d):
            hooks.append(m.register_forward_pre_hook(conv_hook))
        elif isinstance(m, selact.SelectiveLinear):
            hooks.append(m.register_forward_pre_hook(linear_hook))
        elif isinstance(m, nn.Conv2d | nn.Linear):
            hooks.append(m.register_forward_hook(dense_hook))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for x in batches:
            dense_model(x)  # the same architecture, never converted
    dense = counter.get_total_flops() // 2
    return executed / dense
