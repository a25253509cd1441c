"""``det``: a compact single-stage detector, a convolutional backbone with a neck of
self-attention blocks over its coarse feature map and an FCOS head.

Layout (strides for an ``S x S`` input):

- backbone: a 3x3 stride-2 stem convolution, then stages of torchvision ResNet ``BasicBlock``\\ s,
  each starting with a stride-2 block: C2 (S/4), C3 (S/8), C4 (S/16);
- neck: ``depth`` pre-norm transformer blocks (``nn.MultiheadAttention`` + a GELU MLP) over the
  tokens of C4, with a fixed 2-D sine position code, projected to and from ``neck_dim``;
- FPN (torchvision's ``FeaturePyramidNetwork``) over C3 and the neck's output, plus a max-pooled
  P5 (S/32);
- torchvision's ``FCOS``: its head (``num_convs`` GroupNorm conv layers per branch), sigmoid
  focal, GIoU and centre-ness losses, box coder, score threshold, NMS and rescaling.

Every weight layer is an ``nn.Conv2d``, ``nn.Linear`` or ``nn.MultiheadAttention``, so
:func:`selact.sparsify` converts it with :func:`layer_filter` choosing ``conv``, ``attn_linear``
or ``all`` layers. The model takes a batch of letterboxed images in [0, 1] (``(B, 3, S, S)`` or a
list) and, in training mode, a list of targets (``boxes`` xyxy in input pixels, ``labels`` in
``[0, num_classes)``), returning torchvision's loss dict; in eval mode it returns one dict of
``boxes``, ``scores`` and ``labels`` per image, in input pixels.

The factory's defaults are the full-scale model for a GPU (input 256); ``det(**CPU_PRESET)``
(input 128, 0.85 M parameters, 0.13 G multiply-accumulates per image) is the reduced model that
trains on 2 CPU cores.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from selact.models._registry import register_model

__all__ = [
    "AttentionBlock",
    "AttentionNeck",
    "DetBackbone",
    "LAYER_GROUPS",
    "PREDICTORS",
    "layer_filter",
    "det",
    "CPU_PRESET",
    "SMOKE_PRESET",
]

# ImageNet statistics: the usual normalisation, applied inside the model by FCOS's transform.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False), nn.BatchNorm2d(out_channels)
    )
    layers = [BasicBlock(in_channels, out_channels, stride=2, downsample=downsample)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def sine_position_code(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """A fixed ``(height * width, dim)`` 2-D sine/cosine code (DETR's), rows in raster order."""
    if dim % 4:
        raise ValueError(f"the position code needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freq
    xs = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freq
    y_code = torch.cat([ys.sin(), ys.cos()], 1)[:, None, :].expand(height, width, 2 * quarter)
    x_code = torch.cat([xs.sin(), xs.cos()], 1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([y_code, x_code], 2).reshape(height * width, dim)


class AttentionBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Args:
        dim: token width.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLP over ``dim``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class AttentionNeck(nn.Module):
    """Self-attention over the tokens of a feature map: a 1x1 projection to ``dim``, a sine
    position code, ``depth`` :class:`AttentionBlock`\\ s, a final norm and a 1x1 projection back
    to ``out_channels``. Shapes ``(B, C, H, W) -> (B, out_channels, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.proj_in = nn.Conv2d(in_channels, dim, 1)
        self.blocks = nn.Sequential(*[AttentionBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Conv2d(dim, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)
        tokens = tokens + sine_position_code(h, w, self.dim, x.device).to(tokens.dtype)
        tokens = self.norm(self.blocks(tokens))
        return self.proj_out(tokens.transpose(1, 2).reshape(b, self.dim, h, w))


class DetBackbone(nn.Module):
    """Stem, ResNet stages, the attention neck on C4 and an FPN: ``{"p3", "p4", "pool"}``.

    Args:
        widths: channels of the stem, C2, C3 and C4.
        blocks: ``BasicBlock``\\ s per stage (C2, C3, C4).
        neck_dim, neck_depth, neck_heads, mlp_ratio: the attention neck.
        fpn_channels: channels of every pyramid level (``out_channels``, read by FCOS).
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 2, 2),
        neck_dim: int = 256,
        neck_depth: int = 4,
        neck_heads: int = 8,
        mlp_ratio: float = 2.0,
        fpn_channels: int = 128,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 3:
            raise ValueError("widths names the stem and 3 stages; blocks the 3 stages")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.c2 = _stage(widths[0], widths[1], blocks[0])
        self.c3 = _stage(widths[1], widths[2], blocks[1])
        self.c4 = _stage(widths[2], widths[3], blocks[2])
        self.neck = AttentionNeck(widths[3], widths[3], neck_dim, neck_depth, neck_heads, mlp_ratio)
        self.fpn = FeaturePyramidNetwork(
            [widths[2], widths[3]], fpn_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c3 = self.c3(self.c2(self.stem(x)))
        c4 = self.c4(c3)
        c4 = c4 + self.neck(c4)  # residual: the neck refines the convolutional features
        return self.fpn(OrderedDict([("p3", c3), ("p4", c4)]))


#: Names (last component) of the head's prediction layers, kept dense like a classifier.
PREDICTORS = ("cls_logits", "bbox_reg", "bbox_ctrness")
#: The layer groups of a sweep: which layers :func:`layer_filter` selects.
LAYER_GROUPS = ("conv", "attn_linear", "all")


def layer_filter(group: str):
    """A ``filter_fn(module, name)`` for :func:`selact.sparsify` choosing a layer group of ``det``.

    ``conv``: every ``Conv2d`` but the stem (raw pixels) and the head's predictors (the
    detector's classifier); ``attn_linear``: the neck's ``MultiheadAttention`` and ``Linear``
    layers; ``all``: both.
    """
    if group not in LAYER_GROUPS:
        raise ValueError(f"unknown layer group {group!r}; known: {', '.join(LAYER_GROUPS)}")

    def selects(module: nn.Module, name: str) -> bool:
        is_conv = isinstance(module, nn.Conv2d)
        if is_conv and (name.endswith("stem.0") or name.rsplit(".", 1)[-1] in PREDICTORS):
            return False
        is_attn = isinstance(module, nn.MultiheadAttention | nn.Linear)
        return (is_conv and group != "attn_linear") or (is_attn and group != "conv")

    return selects


def _fcos(backbone: DetBackbone, num_classes: int, image_size: int, head_convs: int) -> FCOS:
    levels = 3  # p3, p4 and the pooled p5
    anchor_generator = AnchorGenerator(
        sizes=tuple((8 * 2**i,) for i in range(levels)), aspect_ratios=((1.0,),) * levels
    )
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=head_convs)
    return FCOS(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(MEAN),
        image_std=list(STD),
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=0.05,  # low, as mAP needs the whole precision-recall curve
        nms_thresh=0.6,
        detections_per_img=100,
        topk_candidates=1000,
    )


#: The reduced model that trains on 2 CPU cores (about 0.13 G multiply-accumulates per
#: 128x128 image, against 3.5 G for the full-scale defaults at 256x256).
CPU_PRESET: dict[str, Any] = {
    "image_size": 128,
    "widths": (16, 32, 64, 128),
    "blocks": (1, 1, 1),
    "neck_dim": 128,
    "neck_depth": 2,
    "neck_heads": 4,
    "fpn_channels": 64,
    "head_convs": 2,
}
#: The tiny model of smoke runs and tests (input 64): seconds on a CPU.
SMOKE_PRESET: dict[str, Any] = {
    "image_size": 64,
    "widths": (8, 16, 32, 32),
    "blocks": (1, 1, 1),
    "neck_dim": 32,
    "neck_depth": 1,
    "neck_heads": 2,
    "fpn_channels": 32,
    "head_convs": 1,
}


@register_model("det")
def det(
    num_classes: int = 20,
    image_size: int = 256,
    widths: Sequence[int] = (32, 64, 128, 256),
    blocks: Sequence[int] = (1, 2, 2),
    neck_dim: int = 256,
    neck_depth: int = 4,
    neck_heads: int = 8,
    mlp_ratio: float = 2.0,
    fpn_channels: int = 128,
    head_convs: int = 4,
) -> FCOS:
    """The ``det`` detector (see the module docstring); the defaults are the full-scale model,
    ``det(**CPU_PRESET)`` the reduced one."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    backbone = DetBackbone(
        widths, blocks, neck_dim, neck_depth, neck_heads, mlp_ratio, fpn_channels
    )
    model = _fcos(backbone, num_classes, image_size, head_convs)
    model.image_size = image_size
    return model
