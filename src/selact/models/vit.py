"""A small Vision Transformer for 32x32 images: patch 4, dim 192, depth 6, 3 heads, MLP 384.

Dosovitskiy et al.'s ViT ("An Image is Worth 16x16 Words", 2021) scaled to CIFAR: a 4x4 patch
embedding (64 tokens), learned position embeddings, 6 pre-norm blocks of multi-head
self-attention (``nn.MultiheadAttention``, which :func:`selact.sparsify` converts) and a GELU MLP,
then a final LayerNorm, the mean over tokens and a linear head. 1.2 M parameters, 120 M
multiply-accumulates per image (of which 9 M in the attention products QKᵀ and PV).

Unlike a CNN's, a transformer's projections read LayerNorm outputs with no zeros, so zero-skipping
saves almost nothing, except in the MLP's second layer, which reads GELU outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from selact.models._registry import register_model

__all__ = ["Block", "ViT", "vit"]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)).

    Args:
        dim: token width. heads: attention heads. mlp: hidden width of the MLP.
        dropout: on the attention probabilities and after each residual branch.
    """

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    """Patch embedding, position embedding, blocks, LayerNorm, token mean, linear head.

    Args:
        image_size, patch: the image side and the patch side (image_size / patch tokens a side).
        dim, depth, heads, mlp: width, blocks, attention heads, MLP hidden width.
        num_classes: outputs of the head. dropout: see :class:`Block`.
    """

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp: int = 384,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


@register_model("vit")
def vit(num_classes: int = 10, **kwargs) -> ViT:
    """The project's CIFAR ViT: patch 4, dim 192, depth 6, 3 heads, MLP 384 (fixed)."""
    return ViT(num_classes=num_classes, **kwargs)
