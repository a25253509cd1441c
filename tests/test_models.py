"""The model registry and every registered model: shapes, finite outputs, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selact.models import SmallCNN, create_model, list_models, register_model


def test_registry_lists_and_creates():
    assert "small_cnn" in list_models()
    assert list_models("small_*") == ["small_cnn"]
    assert list_models("nothing*") == []
    assert isinstance(create_model("small_cnn", num_classes=7), SmallCNN)


def test_unknown_model_lists_known():
    with pytest.raises(KeyError, match="small_cnn"):
        create_model("no_such_model")


def test_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("small_cnn")(lambda: nn.Identity())


DETECTORS = {"det"}  # tested in test_models_det.py: they take targets and return losses


@pytest.mark.parametrize("name", [n for n in list_models() if n not in DETECTORS])
def test_forward_backward(name):
    model = create_model(name, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    y = model(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


def test_small_cnn_layout():
    model = SmallCNN(num_classes=10, widths=(8, 16, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert convs[0].in_channels == 3 and model.classifier.in_features == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=())
