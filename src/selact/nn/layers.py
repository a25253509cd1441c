"""Selective Linear and Conv2d: the AMU picks the inputs, MGEMM multiplies only those."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selact import mgemm
from selact.config import SelectiveConfig
from selact.mgemm import cpu
from selact.nn.base import SelectiveModule


class SelectiveLinear(SelectiveModule):
    """``nn.Linear`` whose inputs are masked per :class:`SelectiveConfig` before multiplying.

    Args:
        linear: the dense layer; its ``weight`` and ``bias`` Parameters are shared, not copied.
        config: how inputs are chosen.
    """

    kind = "linear"

    def __init__(self, linear: nn.Linear, config: SelectiveConfig) -> None:
        super().__init__(config)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.remember(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {super().extra_repr()}"
        )


class SelectiveConv2d(SelectiveModule):
    """``nn.Conv2d`` whose input feature map is masked per :class:`SelectiveConfig`.

    The density unit is a sample's whole input map (C·H·W). Weights are shared with the original.
    """

    kind = "conv2d"

    def __init__(self, conv: nn.Conv2d, config: SelectiveConfig) -> None:
        super().__init__(config)
        for name in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.remember(conv)
        self._fused_geometry: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, dims=(3, 4), size=self.in_channels, dim=-3)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        padding = self.padding
        if self.padding_mode != "zeros":  # the padded border becomes real input
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        args = (self.stride, padding, self.dilation, self.groups)
        if self._fused_route(x):
            mask, y, executed = self._fused_forward(x)
        else:
            mask = self.input_mask(x, self.weight, "conv", self.groups)
            x, weight, bias = self.autocast_operands(x, self.weight, self.bias)
            y, executed = self.mgemm_call(mgemm.conv2d, x, weight, bias, *args, mask=mask)
        if self.config.counting:
            with torch.no_grad():
                zero_skip = mgemm.conv2d_macs(x != 0, self.weight.shape, *args)
            dense = mgemm.dense_conv2d_macs(self.weight.shape, y.shape)
            self.record(x, mask, dense=dense, zero_skip=zero_skip, executed=executed)
        return y.squeeze(0) if unbatched else y

    def _fused_route(self, x: torch.Tensor) -> bool:
        """Whether this call takes the CPU kernels' fused route: the AMU's channel or element
        top-k and the masked convolution in one kernel call (at batch 1 on small maps the mask's
        tensor ops and the dispatcher's checks cost more than the convolution)."""
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        element = self.config.granularity == "element"
        _, c, h, w = x.shape  # a sample's top-k ranks c·h·w inputs (element) or c channels
        units = c * h * w if element else c
        if not self.fused_keep(units, ("channel", "element")):
            return False
        if not self._fused_geometry:  # what depends on the layer alone, once
            self._fused_geometry = cpu.conv_geometry(self.stride, self.padding, self.dilation)
        return self.fused_call(x, self.weight)

    def _fused_forward(self, x: torch.Tensor) -> tuple:
        norms = None
        if self.config.strategy == "sapw":
            norms = self._input_norms(self.weight, "conv", 1).reshape(-1)
        counting = self.config.counting
        if self.config.granularity == "element":
            y, keep, executed = cpu.select_element_conv2d(
                x, self.weight, self.bias, self._fused_geometry, keep=self._fused_keep,
                norms=norms, count=counting,
            )  # fmt: skip
            return (keep if counting else None), y, executed
        y, keep, executed = cpu.select_conv2d(
            x, self.weight, self.bias, self._fused_geometry, keep=self._fused_keep, norms=norms,
            count=counting,
        )  # fmt: skip
        return (keep.view(*keep.shape, 1, 1) if counting else None), y, executed

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"{super().extra_repr()}"
        )
