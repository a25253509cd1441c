"""The reference backend: plain PyTorch that defines every MGEMM result and its MAC count."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selact.mgemm.counting import conv2d_macs, linear_macs
from selact.mgemm.registry import Backend, register_backend


def _apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the dropped entries zero; gradients reach the kept entries only, and a dropped
    inf or NaN stays out (a product would turn it into NaN)."""
    if mask is None:
        return x
    if x.device.type == "cpu" and _finite(x):
        # On the CPU where() is not vectorised: 3.5 ms against 1.1 for the product on a
        # (128, 16, 32, 32) batch, and its backward is another where() (a mask-aware ResNet-20
        # training step spent a quarter of its time there). A finite x makes them equal.
        return x * mask.to(x.dtype)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no inf or NaN (a max of |x|: 0.6 ms on 2M floats, isfinite 2.7)."""
    with torch.no_grad():
        return x.numel() == 0 or bool(x.abs().max() < math.inf)


def linear(x, weight, bias=None, *, in_mask=None, out_mask=None, count=True):
    """``Y = M_out ⊙ ((M ⊙ X) Wᵀ + b)``; dropped outputs are zero."""
    kept_x = _apply_mask(x, in_mask)
    y = F.linear(kept_x, weight, bias)
    y = _apply_mask(y, out_mask)
    if not count:
        return y, None
    with torch.no_grad():
        return y, linear_macs(kept_x != 0, out_mask, weight.shape[0])


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, in_mask=None, count=True
):
    """``Y = conv(M ⊙ X, W) + b``."""
    kept_x = _apply_mask(x, in_mask)
    y = dense_conv2d(kept_x, weight, bias, stride, padding, dilation, groups)
    if not count:
        return y, None
    with torch.no_grad():
        return y, conv2d_macs(kept_x != 0, weight.shape, stride, padding, dilation, groups)


def dense_conv2d(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv2d``, except where it is known to be wrong: on CPUs with AMX, oneDNN's bfloat16
    convolution gives wrong outputs when the output width is 1 and the width stride above 1
    (pytorch/pytorch#169688, oneDNN 3.12 in torch 2.14; found here by hypothesis, errors larger
    than the outputs). Those cases run in float32 and round once."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and _degenerate_strided_width(x.shape[-1], weight.shape[-1], stride, padding, dilation)
    ):
        y = F.conv2d(
            x.float(), weight.float(), None if bias is None else bias.float(),
            stride, padding, dilation, groups,
        )  # fmt: skip
        return y.to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _degenerate_strided_width(width, kernel, stride, padding, dilation) -> bool:
    if isinstance(padding, str):
        return False
    s, p, d = (v if isinstance(v, int) else v[-1] for v in (stride, padding, dilation))
    return s > 1 and (width + 2 * p - d * (kernel - 1) - 1) // s + 1 == 1


def attention_values(probs, v, *, key_mask=None, renormalize=True, count=True):
    """``O = P' V`` with ``P'`` the kept probabilities, renormalised to sum to one per query."""
    kept_p = _apply_mask(probs, key_mask)
    if key_mask is not None and renormalize:
        total = kept_p.sum(-1, keepdim=True)
        tiny = torch.finfo(total.dtype).tiny
        kept_p = torch.where(total > 0, kept_p / total.clamp_min(tiny), kept_p)
    out = kept_p @ v
    if not count:
        return out, None
    with torch.no_grad():
        return out, (kept_p != 0).sum(dtype=torch.int64) * v.shape[-1]


register_backend(
    Backend(
        name="reference",
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
        ops={"linear": linear, "conv2d": conv2d, "attention_values": attention_values},
        priority=0,
    )
)
