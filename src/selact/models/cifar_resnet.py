"""He et al.'s CIFAR ResNets (ResNet-20, ResNet-56): three stages of basic blocks, 16/32/64 wide.

"Deep Residual Learning for Image Recognition" (2016), section 4.2: a 3x3 stem convolution with 16
channels, then 3 stages of ``n`` basic blocks (two 3x3 conv-BN layers each) at 32x32, 16x16 and
8x8 with 16, 32 and 64 channels, global average pooling and a linear classifier; 6n + 2 layers.
Shortcuts that change shape are the paper's option A: subsample by 2 and pad the new channels with
zeros (no parameters). ResNet-20: 0.27 M parameters, 40.6 M multiply-accumulates per image;
ResNet-56: 0.85 M and 125.5 M.

Every convolution but the stem reads the output of a ReLU, so about half its inputs are zero: the
free sparsity that zero-skipping counts, and that SAPI and SAPW cut further.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selact.models._registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56"]


class BasicBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, plus the shortcut, then ReLU.

    Args:
        in_channels, out_channels: widths; a change of width comes with stride 2.
        stride: of the first convolution (and of the shortcut's subsampling).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.pad = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n + 2 layer CIFAR ResNet (see the module docstring).

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110).
        num_classes: outputs of the classifier.
        widths: channels of the three stages.
        zero_init_residual: start each block as the identity (its last BN scale at zero).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if i > 0 and j == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if zero_init_residual and isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet20")
def resnet20(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 images (0.27 M parameters)."""
    return CifarResNet(20, num_classes, **kwargs)


@register_model("resnet56")
def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 images (0.85 M parameters)."""
    return CifarResNet(56, num_classes, **kwargs)
