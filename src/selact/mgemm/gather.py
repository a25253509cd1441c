"""The ``gather`` backend: a convolution over the kept input channels only.

With a channel mask (B, C, 1, 1) or a batch-shared one (1, C, 1, 1), the kept channels of the
input and the matching slices of the weight are gathered, and the dense convolution of the device
(oneDNN, cuDNN) runs on them alone: work and time fall with the density. Differentiable (the
gathers pass gradients back to the kept channels and weights); any device and float dtype.
"""

from __future__ import annotations

import torch

from selact.mgemm.counting import conv2d_macs
from selact.mgemm.reference import dense_conv2d
from selact.mgemm.registry import Backend, Case, register_backend

#: Largest batch with per-sample masks: each sample is a separate convolution call.
MAX_SAMPLES = 16


def conv2d(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, in_mask=None, count=True
):
    args = (stride, padding, dilation, groups)
    if in_mask is None:
        y = dense_conv2d(x, weight, bias, *args)
    else:
        keep = in_mask.expand(in_mask.shape[0], x.shape[1], 1, 1).reshape(in_mask.shape[0], -1)
        if keep.shape[0] == 1:  # batch-shared: one gather for the whole batch
            y = _gathered_conv(x, weight, bias, keep[0], args)
        else:
            y = torch.cat(
                [
                    _gathered_conv(x[b : b + 1], weight, bias, keep[b], args)
                    for b in range(x.shape[0])
                ]
            )
    if not count:
        return y, None
    kept = x != 0 if in_mask is None else (x != 0) & in_mask
    return y, conv2d_macs(kept, weight.shape, *args)


def _gathered_conv(x, weight, bias, keep, args):
    index = keep.nonzero().squeeze(1)
    if index.numel() == 0:  # nothing kept: a one-channel zero convolution gives the bias alone
        return dense_conv2d(x[:, :1] * 0, weight[:, :1] * 0, bias, *args)
    return dense_conv2d(x.index_select(1, index), weight.index_select(1, index), bias, *args)


def _check(case: Case) -> str | None:
    mask = case.shapes["in_mask"]
    if case.shapes["params"][3] != (1,):
        return "grouped convolutions are not gathered"
    if mask is None or len(mask) != 4 or mask[2:] != (1, 1):
        return "it gathers channel or batch-shared masks only"
    if mask[0] > MAX_SAMPLES:
        return f"{mask[0]} per-sample masks exceed its {MAX_SAMPLES}-sample limit"
    return None


register_backend(
    Backend(
        name="gather",
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        ops={"conv2d": conv2d},
        priority=5,
        # Measured on an H200 (batch 1, 256 channels at 32x32, bf16): 6x the dense cuDNN time
        # (the nonzero() sync and launches dominate), so on CUDA it serves only when named.
        auto_devices=frozenset({"cpu"}),
        check=_check,
    )
)
