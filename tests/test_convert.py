"""One-call conversion of public models: density 1.0 reproduces them, 0.5 changes them, densify
undoes it exactly, and bad requests raise clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import selact
from selact.nn import SelectiveConv2d, SelectiveLinear
from tests.models import MODELS, build


def _relative_change(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_public_models(name):
    model, x = build(name)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        dense = model(x)

        selact.sparsify(model, density=1.0, strategy="sapw")
        torch.testing.assert_close(model(x), dense, rtol=1e-4, atol=1e-5)
        selact.densify(model)

        selact.sparsify(model, density=0.5, key_density=0.5)
        sparse = model(x)
        report = selact.stats(model)
        selact.densify(model)

    converted = {n: s for n, s in report.layers.items() if s.converted}
    assert converted, "nothing was converted"
    for layer_name, s in converted.items():
        assert s.calls > 0, f"{layer_name} never ran"
        assert s.executed_macs < s.dense_macs, f"{layer_name} saved nothing"
    assert _relative_change(sparse, dense) > 1e-3
    assert report.total.executed_macs < report.total.dense_macs
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(isinstance(m, selact.SelectiveModule) for m in model.modules())


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def test_default_filter_keeps_first_conv_and_classifier_dense():
    model = selact.sparsify(_cnn(), density=0.5)
    kinds = {name: type(m) for name, m in model.named_children()}
    assert kinds["0"] is nn.Conv2d and kinds["10"] is nn.Linear
    assert kinds["2"] is SelectiveConv2d and kinds["4"] is SelectiveConv2d
    assert kinds["8"] is SelectiveLinear


def test_weights_are_shared_not_copied():
    dense = _cnn()
    weight = dense[2].weight
    model = selact.sparsify(dense, density=0.5)
    assert model[2].weight is weight
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(model[2].weight, weight)


def test_density_one_reproduces_dense_with_every_granularity_and_strategy():
    model, x = _cnn(), torch.randn(2, 3, 9, 7)
    expected = model(x)
    for strategy in ("sapi", "sapw", "random", "dense"):
        for granularity in selact.GRANULARITIES:
            selact.sparsify(model, density=1.0, strategy=strategy, granularity=granularity)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
            selact.densify(model)


def test_overrides_precedence_and_skip():
    model = selact.sparsify(
        _cnn(),
        density=0.5,
        overrides={"4": {"density": 0.25}, "re:[0-9]": {"density": 0.75}, "8": None},
    )
    assert model[2].config.density == 0.75  # regex
    assert model[4].config.density == 0.25  # exact beats regex
    assert type(model[8]) is nn.Linear  # None skips


def test_filter_fn_receives_module_and_name():
    seen = []

    def only_pointwise(module, name):
        seen.append(name)
        return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)

    model = selact.sparsify(_cnn(), filter_fn=only_pointwise)
    assert "4" in seen and "0" in seen
    assert [n for n, m in model.named_children() if isinstance(m, selact.SelectiveModule)] == ["4"]


def test_errors_name_the_layer():
    with pytest.raises(ValueError, match="density"):
        selact.sparsify(_cnn(), density=0.0)
    with pytest.raises(ValueError, match="granularity"):
        selact.sparsify(_cnn(), granularity="rows")
    with pytest.raises(ValueError, match="strategy"):
        selact.sparsify(_cnn(), strategy="sapx")
    model = selact.sparsify(_cnn())
    with pytest.raises(RuntimeError, match="already sparsified.*'2'"):
        selact.sparsify(model)
    with pytest.raises(TypeError, match=r"'1'.*Conv1d.*convertible: .*Conv2d"):
        selact.sparsify(
            nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1)), filter_fn=lambda m, n: True
        )
    with pytest.raises(ValueError, match="'44'.*did you mean '4'"):
        selact.sparsify(_cnn(), overrides={"44": None})
    x = torch.randn(1, 3, 5, 5)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'1\.2'.*\(1, 8, 5, 5\).*NaN"):
        selact.sparsify(nn.Sequential(nn.Identity(), _cnn()))(x)


def test_check_finite_can_be_switched_off():
    model = selact.sparsify(_cnn(), check_finite=False)
    x = torch.randn(1, 3, 5, 5)
    x[0, 0, 0, 0] = float("inf")
    model(x)  # no error: the caller chose speed over the check


def test_subclass_with_own_forward_is_not_converted():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = selact.sparsify(nn.Sequential(nn.Linear(4, 4), Scaled(4, 4), nn.Linear(4, 2)))
    assert type(model[1]) is Scaled


def test_training_gradients_reach_every_parameter():
    model = selact.sparsify(_cnn(), density=0.5, strategy="sapw").train()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
