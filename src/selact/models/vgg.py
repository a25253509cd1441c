"""VGG-16 with batch norm for 32x32 images: 13 3x3 conv-BN-ReLU layers, 5 max-pools, a linear head.

Simonyan and Zisserman's configuration D ("Very Deep Convolutional Networks", 2015) with batch
norm after every convolution, as commonly trained on CIFAR: the five pools bring 32x32 to 1x1,
so the classifier is one Linear(512, classes). 14.7 M parameters, 313 M multiply-accumulates per
image. Every convolution but the first reads the output of a ReLU (or of a max-pool over ReLU
outputs).
"""

from __future__ import annotations

import torch
from torch import nn

from selact.models._registry import register_model

__all__ = ["VGG", "vgg16"]

CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Conv-BN-ReLU layers and max-pools per ``config`` ("M" is a pool), then a linear classifier.

    Args:
        config: channels of each convolution, "M" for a 2x2 max-pool.
        num_classes: outputs of the classifier.
        dropout: before the classifier (0: none).
    """

    def __init__(
        self, config: tuple = CONFIG_D, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(c_in, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(self.dropout(x))


@register_model("vgg16")
def vgg16(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-16 with batch norm for 32x32 images (14.7 M parameters)."""
    return VGG(CONFIG_D, num_classes, **kwargs)
