"""The CIFAR models: shapes, sizes, MAC counts, gradients, conversion; torchvision/timm names."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import selact
from selact.models import create_model, list_models

# (parameters in millions, dense MACs per 32x32 image in millions, selective layers by default)
EXPECTED = {
    "resnet20": (0.270, 40.6, 18),
    "resnet56": (0.853, 125.5, 54),
    "vgg16": (14.724, 313.2, 12),
    "vit": (1.806, 113.8, 24),
}


def test_registered():
    assert set(EXPECTED) <= set(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_size_macs_and_gradients(name):
    params, macs, selective = EXPECTED[name]
    model = create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=2e-3)
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert counter.get_total_flops() / 2 / 2 / 1e6 == pytest.approx(macs, abs=0.1)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        dense = model(x)
        selact.sparsify(model, strategy="sapw", density=1.0)
        torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, selact.SelectiveModule) for m in model.modules()) == selective


def test_resnet_depth_is_checked():
    from selact.models.cifar_resnet import CifarResNet

    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_torchvision_and_timm_by_name():
    assert create_model("torchvision:resnet18", num_classes=7).fc.out_features == 7
    timm_model = create_model("timm:resnet18", num_classes=5)
    assert timm_model.num_classes == 5
    with pytest.raises(KeyError, match="torchvision:<name>"):
        create_model("no-such-model")
