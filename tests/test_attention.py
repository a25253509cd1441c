"""Selective attention reproduces the dense attention modules at density 1.0 in every mode they
support, and key selection keeps exactly the top-k keys of each query."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import selact
from selact.nn import SelectiveMultiheadAttention
from selact.nn.attention import SelectiveAttentionValues, SelectiveShiftedWindowAttention


def _wrap(module):
    return nn.Sequential(module)  # the conversion swaps children


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["self", "cross", "kdim", "masks", "causal", "unbatched"])
def test_multihead_attention_density_one_equals_dense(batch_first, mode):
    kdim = 6 if mode == "kdim" else None
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    dense = copy.deepcopy(mha)
    shape = (2, 5, 12) if batch_first else (5, 2, 12)
    q = torch.randn(shape)
    kv_shape = (2, 7, kdim or 12) if batch_first else (7, 2, kdim or 12)
    k = v = q if mode in ("self", "masks", "causal") else torch.randn(kv_shape)
    kwargs = {}
    if mode == "unbatched":
        q, k, v = q[0], k[0], k[0]
    if mode == "masks":
        kwargs = {
            "key_padding_mask": torch.tensor([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]).bool(),
            "attn_mask": (torch.rand(5, 5) > 0.7).fill_diagonal_(False),
        }
    if mode == "causal":
        kwargs = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True}
    model = selact.sparsify(_wrap(mha), density=1.0, filter_fn=lambda m, n: True)
    assert isinstance(model[0], SelectiveMultiheadAttention)
    for average in (True, False):
        out, weights = model[0](q, k, v, average_attn_weights=average, **kwargs)
        ref_out, ref_weights = dense(q, k, v, average_attn_weights=average, **kwargs)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    out, weights = model[0](q, k, v, need_weights=False, **kwargs)  # PyTorch's fused attention
    ref_out, _ = dense(q, k, v, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


def test_multihead_attention_state_dict_keys_unchanged_and_densify_restores():
    mha = nn.MultiheadAttention(8, 2)
    keys = set(mha.state_dict())
    model = selact.sparsify(_wrap(mha), density=0.5, filter_fn=lambda m, n: True)
    converted_keys = set(model[0].state_dict())
    assert keys <= converted_keys
    assert converted_keys - keys == {"in_proj.threshold", "out_proj.threshold"}
    selact.densify(model)
    assert (
        model[0] is mha and type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    )


def test_multihead_attention_with_bias_k_is_refused():
    with pytest.raises(TypeError, match="'0'.*bias_k"):
        selact.sparsify(
            _wrap(nn.MultiheadAttention(8, 2, add_bias_kv=True)), filter_fn=lambda m, n: True
        )


def test_key_selection_keeps_top_k_keys_per_query():
    site = SelectiveAttentionValues(selact.SelectiveConfig(key_density=0.4))
    probs = torch.rand(2, 3, 4, 10).softmax(-1)
    v = torch.randn(2, 3, 10, 5)
    out = site(probs, v)
    top = probs.topk(4, dim=-1)
    kept = top.values / top.values.sum(-1, keepdim=True)
    expected = (
        kept.unsqueeze(-1)
        * torch.gather(
            v.unsqueeze(2).expand(2, 3, 4, 10, 5),
            3,
            top.indices.unsqueeze(-1).expand(-1, -1, -1, -1, 5),
        )
    ).sum(-2)
    torch.testing.assert_close(out, expected)
    stats = selact.stats(nn.Sequential(site)).total
    assert stats.executed_macs == 2 * 3 * 4 * 10 * 5 + 2 * 3 * 4 * 4 * 5  # dense QK + kept PV
    assert stats.dense_macs == 2 * (2 * 3 * 4 * 10 * 5)
    assert stats.density == pytest.approx(0.4)


@pytest.mark.parametrize("builder", [torchvision.models.swin_t, torchvision.models.swin_v2_t])
def test_swin_window_attention_density_one_equals_dense(builder):
    torch.manual_seed(0)
    model = builder().eval()
    stage = model.features[1][1].attn  # a shifted block
    assert sum(stage.shift_size) > 0
    x = torch.randn(2, 9, 11, stage.qkv.in_features)  # odd sizes: padded windows
    with torch.no_grad():
        stage.qkv.bias.normal_()  # V2 must still drop the key bias
        expected = stage(x)
        wrapped = selact.sparsify(
            _wrap(stage), density=1.0, key_density=1.0, filter_fn=lambda m, n: True
        )
        assert isinstance(wrapped[0], SelectiveShiftedWindowAttention)
        torch.testing.assert_close(wrapped[0](x), expected, rtol=1e-5, atol=1e-5)
    names = {n for n, m in wrapped.named_modules() if isinstance(m, selact.SelectiveModule)}
    assert names == {"0.qkv", "0.proj", "0.attn"}  # cpb_mlp (V2) stays dense


def test_timm_attention_with_key_selection_equals_dense_at_density_one():
    timm = pytest.importorskip("timm")
    from timm.layers.attention import Attention

    attention = Attention(16, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 6, 16)
    expected = attention(x)
    model = selact.sparsify(
        _wrap(attention), density=1.0, key_density=1.0, filter_fn=lambda m, n: True
    )
    assert type(model[0]).__name__ == "SelectiveTimmAttention"
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-6)
    assert timm is not None
