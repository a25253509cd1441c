"""The ``det`` detector: losses and gradients, detections, layer groups, and selective conversion."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import selact
from selact.models import create_model, list_models
from selact.models.det import LAYER_GROUPS, SMOKE_PRESET, layer_filter, sine_position_code

TINY = SMOKE_PRESET


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 58.0]])
    return [{"boxes": boxes, "labels": torch.tensor([3, 7])} for _ in range(n)]


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("det", num_classes=20, **TINY)


def test_registered():
    assert "det" in list_models()
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("det", image_size=100)


def test_losses_and_gradients(model):
    model.train()
    losses = model(torch.rand(2, 3, 64, 64), _targets(2))
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the attention neck is on the gradient path
    assert model.backbone.neck.blocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_detections(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert len(out) == 3
    for det in out:
        assert set(det) == {"boxes", "scores", "labels"} and det["boxes"].shape[1:] == (4,)
        assert len(det["boxes"]) <= 100 and (det["labels"] < 20).all()


def test_position_code():
    code = sine_position_code(3, 5, 8)
    assert code.shape == (15, 8) and torch.unique(code, dim=0).shape[0] == 15
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_code(2, 2, 6)


def test_layer_groups(model):
    names = {
        g: [n for n, m in model.named_modules() if layer_filter(g)(m, n)] for g in LAYER_GROUPS
    }
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert "backbone.stem.0" in convs and "backbone.stem.0" not in names["conv"]
    assert not any(n.endswith(("cls_logits", "bbox_reg", "bbox_ctrness")) for n in names["all"])
    assert all(n in convs for n in names["conv"])
    assert any(n.endswith(".attn") for n in names["attn_linear"])
    assert any(n.endswith("mlp.0") for n in names["attn_linear"])
    assert not set(names["conv"]) & set(names["attn_linear"])
    assert set(names["all"]) == set(names["conv"]) | set(names["attn_linear"])
    with pytest.raises(ValueError, match="unknown layer group"):
        layer_filter("heads")


def test_dense_density_equals_dense_model(model):
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.backbone(x)
        selective = selact.sparsify(
            copy.deepcopy(model), strategy="sapw", density=1.0, filter_fn=layer_filter("all")
        )
        converted = selective.backbone(x)
    for key in reference:
        torch.testing.assert_close(converted[key], reference[key], rtol=1e-5, atol=1e-5)
    kinds = {type(m).__name__ for m in selective.modules()}
    assert {"SelectiveConv2d", "SelectiveLinear", "SelectiveMultiheadAttention"} <= kinds


def test_selective_counts_and_roundtrip(model, tmp_path):
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    selective = selact.sparsify(
        copy.deepcopy(model), strategy="sapi", density=0.3, filter_fn=layer_filter("conv")
    )
    with torch.no_grad():
        out = selective(x)
    total = selact.stats(selective).total
    assert 0 < total.executed_macs < total.zero_skip_macs < total.dense_macs
    selact.save(selective, tmp_path / "det.safetensors")
    loaded = selact.load(copy.deepcopy(model), tmp_path / "det.safetensors")
    with torch.no_grad():
        again = loaded(x)
    for a, b in zip(out, again, strict=True):
        torch.testing.assert_close(a["scores"], b["scores"])
