"""Statistics: dense MACs agree with torch.utils.flop_counter, sums add up, reset works."""

from __future__ import annotations

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import selact


def test_dense_macs_equal_flop_counter_on_resnet18_batch1():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_flop_counts()
    selact.sparsify(model, density=0.5)
    with torch.no_grad():
        model(x)
    report = selact.stats(model)
    counted = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | selact.SelectiveModule)
    ]
    assert set(report.layers) == set(counted) and len(counted) == 21
    for name, layer in report.layers.items():
        expected = sum(flops[f"ResNet.{name}"].values()) // 2
        assert layer.dense_macs == expected, name
    assert report.total.dense_macs == sum(s.dense_macs for s in report.layers.values())


def test_counts_accumulate_and_reset():
    model = selact.sparsify(torchvision.models.resnet18().eval(), density=0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        once = selact.stats(model).total
        model(x)
        twice = selact.stats(model).total
    assert twice.dense_macs == 2 * once.dense_macs
    assert twice.executed_macs == 2 * once.executed_macs
    assert twice.calls == 2 * once.calls
    selact.reset_stats(model)
    assert selact.stats(model).total.calls == 0


def test_fractions_and_table():
    model = selact.sparsify(torchvision.models.resnet18().eval(), density=0.25)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    report = selact.stats(model)
    total = report.total
    assert total.executed_macs <= total.zero_skip_macs <= total.dense_macs
    assert 0 < total.executed_fraction < total.zero_skip_fraction <= 1
    converted = [s for s in report.layers.values() if s.converted]
    assert all(abs(s.density - 0.25) < 0.01 for s in converted)
    table = str(report)
    assert "layer1.0.conv1" in table and "total" in table.splitlines()[-1]
    data = report.to_dict()
    assert data["total"]["executed_macs"] == total.executed_macs
    assert len(data["layers"]) == len(report.layers)


def test_counting_off_records_nothing():
    model = selact.sparsify(torchvision.models.resnet18().eval(), density=0.5, counting=False)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    report = selact.stats(model)
    assert all(s.calls == 0 for s in report.layers.values() if s.converted)


def test_unconverted_multihead_attention_is_counted_whole():
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    model = selact.sparsify(torch.nn.Sequential(mha), filter_fn=lambda m, n: False)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        model[0](x, x, x)
    report = selact.stats(model)
    assert list(report.layers) == ["0"]  # out_proj is not listed on its own
    rows = 2 * 5
    assert report.total.dense_macs == 3 * rows * 8 * 8 + rows * 8 * 8
    assert report.total.executed_macs == report.total.dense_macs
    selact.densify(model)
    assert selact.stats(model).layers == {}
