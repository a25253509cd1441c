"""Small-input builds of the public models the conversion is tested on (random weights)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def _randomise_zero_weights(model: nn.Module) -> nn.Module:
    # torchvision zero-initialises some heads (ViT): a zero head would hide every change.
    for p in model.parameters():
        if p.dim() >= 2 and not p.any():
            nn.init.normal_(p, std=0.05)
    return model


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model ``name`` in eval mode and an input for it."""
    if name == "resnet18":
        model, shape = torchvision.models.resnet18(), (2, 3, 32, 32)
    elif name == "mobilenet_v3_small":
        model, shape = torchvision.models.mobilenet_v3_small(), (2, 3, 32, 32)
    elif name == "vit_b_16":
        model, shape = torchvision.models.vit_b_16(image_size=32), (2, 3, 32, 32)
    elif name == "swin_t":
        model, shape = torchvision.models.swin_t(), (1, 3, 64, 64)
    elif name == "timm_vit":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
        shape = (2, 3, 32, 32)
    else:
        raise KeyError(name)
    return _randomise_zero_weights(model).eval(), torch.randn(shape)


MODELS = ["resnet18", "mobilenet_v3_small", "vit_b_16", "swin_t", "timm_vit"]


def assert_fused_routes_match_the_general_route(model: nn.Module, x: torch.Tensor, **settings):
    """``model`` made selective with ``settings`` gives the same outputs and counts through the
    CPU kernels' fused routes as through the general route (the AMU in PyTorch, the reference
    backend)."""
    import selact

    fused = selact.sparsify(model, **settings)
    with torch.inference_mode():
        y_fused = fused(x)
        fused_stats = selact.stats(fused).total
    general = selact.sparsify(selact.densify(fused), **settings, backend="reference")
    with torch.inference_mode():
        y_general = general(x)
        general_stats = selact.stats(general).total
    torch.testing.assert_close(y_fused, y_general, rtol=1e-4, atol=1e-4)
    assert fused_stats.executed_macs == general_stats.executed_macs
    assert fused_stats.zero_skip_macs == general_stats.zero_skip_macs
    assert fused_stats.kept == general_stats.kept
