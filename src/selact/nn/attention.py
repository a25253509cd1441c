"""Selective self-attention: the projections go through the AMU and MGEMM, and optionally each
query sums only its top-k keys (``SelectiveConfig.key_density``).

Three attention implementations are converted:
- ``torch.nn.MultiheadAttention`` (torchvision's ViT): its forward reads ``in_proj_weight`` and
  ``out_proj.weight`` directly, so it is replaced whole by :class:`SelectiveMultiheadAttention`;
- torchvision's Swin ``ShiftedWindowAttention`` (V1 and V2), which calls ``F.linear`` on its
  ``qkv``/``proj`` weights, replaced by :class:`SelectiveShiftedWindowAttention`;
- timm's ``Attention``, which calls its ``qkv``/``proj`` modules: those Linear layers are converted
  in place; with ``key_density`` set it is replaced by :class:`SelectiveTimmAttention`.
Attention products (QKᵀ and PV) are counted by :func:`selact.stats` where keys are selected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selact import amu, mgemm
from selact.config import SelectiveConfig
from selact.nn.base import Converted, SelectiveModule
from selact.nn.convert import register_converter


class SelectiveProjection(SelectiveModule):
    """A selective linear map whose weight lives in its parent (MultiheadAttention's
    in-projection): ``forward(x, weight, bias)``."""

    kind = "linear"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        return self.project(x, weight, bias)


class SelectiveAttentionValues(SelectiveModule):
    """``O = P' V``: each query keeps its ceil(key_density · L_k) most probable keys, renormalised.

    Counts QKᵀ (always dense) and PV (kept probabilities only) for :func:`selact.stats`.
    """

    kind = "attention"

    def forward(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.check_input(probs)
        key_mask = None
        if self.config.key_density is not None and self.config.key_density < 1.0:
            flat = probs.detach().reshape(-1, probs.shape[-1])
            key_mask = amu.topk_keep(flat, self.config.key_density).reshape(probs.shape)
        probs, v = self.autocast_operands(probs, v)
        out, executed = mgemm.attention_values(
            probs, v, key_mask=key_mask, count=self.config.counting, backend=self.config.backend
        )
        if self.config.counting:
            qk = probs.numel() * v.shape[-1]  # the QKᵀ that produced probs, done densely
            with torch.no_grad():
                zero_skip = (probs != 0).sum(dtype=torch.int64) * v.shape[-1]
            self.record(
                probs, key_mask, dense=2 * qk, zero_skip=qk + zero_skip, executed=qk + executed
            )
        return out


def _values_site(config: SelectiveConfig | None) -> SelectiveAttentionValues | None:
    return SelectiveAttentionValues(config) if config and config.key_density is not None else None


def _attend(scores: torch.Tensor, v: torch.Tensor, site, dropout: float, training: bool):
    # Softmax in float32 (as scaled_dot_product_attention does): half-precision softmax drifts.
    probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return (site(probs, v) if site is not None else probs @ v), probs


class SelectiveMultiheadAttention(Converted, nn.Module):
    """``nn.MultiheadAttention`` with a selective in-projection (child ``in_proj``), the
    ``out_proj`` Linear converted like any other, and optional key selection (child ``attn``).

    Parameters keep their names (``in_proj_weight``, ``out_proj.weight``, ...), so state dicts of
    the dense model load. ``bias_k``, ``bias_v`` and ``add_zero_attn`` are not supported.
    """

    def __init__(self, mha: nn.MultiheadAttention, config: SelectiveConfig, name: str, resolve):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise TypeError(
                f"layer {name!r}: MultiheadAttention with bias_k/bias_v or add_zero_attn cannot be "
                "converted"
            )
        self.config = config
        for attr in (
            "embed_dim",
            "kdim",
            "vdim",
            "num_heads",
            "head_dim",
            "dropout",
            "batch_first",
            "_qkv_same_embed_dim",
        ):
            setattr(self, attr, getattr(mha, attr))
        for param in (
            "in_proj_weight",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "in_proj_bias",
        ):
            self.register_parameter(param, getattr(mha, param))
        in_proj_config = resolve(f"{name}.in_proj")
        self.in_proj = SelectiveProjection(in_proj_config) if in_proj_config else None
        self.attn = _values_site(resolve(f"{name}.attn"))
        self.out_proj = mha.out_proj
        self.remember(mha)

    def _project(self, x, weight, bias):
        return (
            self.in_proj(x, weight, bias) if self.in_proj is not None else F.linear(x, weight, bias)
        )

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, h = self.embed_dim, self.num_heads
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = self._project(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        else:
            weights = (
                self.in_proj_weight.chunk(3)
                if self._qkv_same_embed_dim
                else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            )
            q, k, v = (
                self._project(t, w, b)
                for t, w, b in zip((query, key, value), weights, biases, strict=True)
            )
        b, lq, ls = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(b, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
        if self.attn is None and not need_weights:  # no keys selected, no weights: SDPA
            bias = None
            if attn_mask is not None or key_padding_mask is not None or is_causal:
                bias = _mask_bias(attn_mask, key_padding_mask, is_causal, b, h, lq, ls, q)
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            scores = (q * (e // h) ** -0.5) @ k.transpose(-2, -1)
            scores = scores + _mask_bias(
                attn_mask, key_padding_mask, is_causal, b, h, lq, ls, scores
            )
            out, probs = _attend(scores, v, self.attn, self.dropout, self.training)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, e))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = probs.mean(1) if average_attn_weights else probs
        return out, weights.squeeze(0) if unbatched else weights


def _mask_bias(attn_mask, key_padding_mask, is_causal, b, h, lq, ls, like):
    """The additive (B, H, L, S) bias of MultiheadAttention's masks (True = not allowed)."""
    bias = torch.zeros((), dtype=like.dtype, device=like.device)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=like.device).triu(1)
    for m, shape in ((attn_mask, (-1, h, lq, ls)), (key_padding_mask, (b, 1, 1, ls))):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, -math.inf)
        if m.dim() == 3 or m.dim() == 2 and shape[0] != -1:  # (B·H, L, S) or key padding (B, S)
            m = m.reshape(shape)
        bias = bias + m.to(like.dtype)
    return bias


@register_converter("torch.nn.modules.activation.MultiheadAttention")
def _mha(module, config, name, resolve):
    return SelectiveMultiheadAttention(module, config, name, resolve)


class SelectiveShiftedWindowAttention(Converted, nn.Module):
    """torchvision's Swin window attention (V1, and V2 with its cosine attention), calling its
    ``qkv`` and ``proj`` modules so that they can be selective; same parameters and buffers."""

    dense_children = ("cpb_mlp",)  # maps a constant coordinate table, not activations

    def __init__(self, swa: nn.Module, config: SelectiveConfig, name: str, resolve):
        super().__init__()
        self.config = config
        self.window_size, self.shift_size = swa.window_size, swa.shift_size
        self.num_heads, self.attention_dropout, self.dropout = (
            swa.num_heads,
            swa.attention_dropout,
            swa.dropout,
        )
        for child_name, child in swa.named_children():
            self.add_module(child_name, child)
        for param_name, param in swa.named_parameters(recurse=False):
            self.register_parameter(param_name, param)
        for buffer_name, buffer in swa.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer)
        self.attn = _values_site(resolve(f"{name}.attn"))
        self._relative_position_bias = type(swa).get_relative_position_bias
        self.remember(swa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._relative_position_bias(self)
        logit_scale = getattr(self, "logit_scale", None)
        window, shift = self.window_size, list(self.shift_size)
        batch, height, width, c = x.shape
        pad_r = (window[1] - width % window[1]) % window[1]
        pad_b = (window[0] - height % window[0]) % window[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, ph, pw, _ = x.shape
        shift = [0 if window[i] >= (ph, pw)[i] else shift[i] for i in range(2)]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        n_windows = (ph // window[0]) * (pw // window[1])
        x = x.view(batch, ph // window[0], window[0], pw // window[1], window[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * n_windows, window[0] * window[1], c)
        qkv = self.qkv(x)
        if logit_scale is not None and self.qkv.bias is not None:  # V2: keys carry no bias
            qkv = torch.cat(
                [qkv[..., :c], qkv[..., c : 2 * c] - self.qkv.bias[c : 2 * c], qkv[..., 2 * c :]],
                -1,
            )
        h = self.num_heads
        q, k, v = qkv.reshape(x.size(0), x.size(1), 3, h, c // h).permute(2, 0, 3, 1, 4)
        if logit_scale is not None:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * (c // h) ** -0.5) @ k.transpose(-2, -1)
        attn = attn + bias
        if sum(shift) > 0:
            mask = _window_shift_mask(x, ph, pw, window, shift, n_windows)
            attn = attn.view(x.size(0) // n_windows, n_windows, h, x.size(1), x.size(1))
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, x.size(1), x.size(1))
        out, _ = _attend(attn, v, self.attn, self.attention_dropout, self.training)
        x = out.transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.view(batch, ph // window[0], pw // window[1], window[0], window[1], c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, ph, pw, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


def _window_shift_mask(x, ph, pw, window, shift, n_windows):
    """The -100 bias that keeps shifted windows from attending across the image's seams."""
    mask = x.new_zeros((ph, pw))
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    mask = mask.view(ph // window[0], window[0], pw // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(n_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@register_converter("torchvision.models.swin_transformer.ShiftedWindowAttention")
@register_converter("torchvision.models.swin_transformer.ShiftedWindowAttentionV2")
def _swin(module, config, name, resolve):
    return SelectiveShiftedWindowAttention(module, config, name, resolve)


class SelectiveTimmAttention(Converted, nn.Module):
    """timm's ``Attention`` with key selection; its ``qkv``, ``gate`` and ``proj`` Linear
    children are converted like any Linear."""

    def __init__(self, attention: nn.Module, config: SelectiveConfig, name: str, resolve):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim, self.scale = (
            attention.num_heads,
            attention.head_dim,
            attention.scale,
        )
        self.attn_dim = getattr(attention, "attn_dim", attention.num_heads * attention.head_dim)
        for child_name, child in attention.named_children():
            self.add_module(child_name, child)
        if "gate" not in self._modules:
            self.gate = None
        self.attn = _values_site(resolve(f"{name}.attn"))
        self.remember(attention)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = scores + _mask_bias(attn_mask, None, is_causal, b, self.num_heads, n, n, scores)
        out, _ = _attend(scores, v, self.attn, self.attn_drop.p, self.training)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


@register_converter("timm.layers.attention.Attention")
@register_converter("timm.models.vision_transformer.Attention")
def _timm(module, config, name, resolve):
    if resolve(f"{name}.attn") is None or config.key_density is None:
        return module  # its Linear children are converted in place; nothing else to do
    return SelectiveTimmAttention(module, config, name, resolve)
