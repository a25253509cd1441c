"""MGEMM: mask general matrix multiplication, the algebra of selective activation.

Each op returns ``(output, macs)``: ``macs`` is the count of executed multiply-accumulates as a
0-dim int64 tensor on the output's device (DESIGN.md section 1 counting rules). Masks are inputs
here; deciding them is the AMU's job (:mod:`selact.amu`).
"""

from __future__ import annotations

import os

import torch
from torch.nn.modules.utils import _pair

from selact.mgemm import cpu as _cpu  # noqa: F401  (registers the CPU backend)
from selact.mgemm import gather as _gather  # noqa: F401  (registers the gather backend)
from selact.mgemm import reference as _reference  # noqa: F401  (registers the reference backend)
from selact.mgemm import triton_backend as _triton  # noqa: F401  (registers the Triton backend)
from selact.mgemm.counting import conv2d_macs, dense_conv2d_macs, dense_linear_macs, linear_macs
from selact.mgemm.registry import (
    BACKENDS,
    ENV_VAR,
    Backend,
    BackendError,
    Case,
    choose,
    planned,
    register_backend,
    remember,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "Case",
    "attention_values",
    "attention_values_case",
    "choose",
    "conv2d",
    "conv2d_case",
    "conv2d_macs",
    "dense_conv2d_macs",
    "dense_linear_macs",
    "linear",
    "linear_case",
    "linear_macs",
    "register_backend",
    "why_not",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Call signatures that the dispatcher gave the ``cpu`` backend are served by its kernels
#: straight away, without the Python below (checks, signature, choice: 10-20 us a call under a
#: cold cache, a tenth of a 768 -> 3072 layer's time at batch 1). See ``Backend.plan``. Not while
#: Dynamo traces (the kernels would break the graph where another backend serves); the kernels
#: leave tensor subclasses (a FakeTensor while torch.export traces) to the Python below.
#: ``is_dynamo_compiling`` rather than ``is_compiling``: 1 instead of 3.5 us a call, cold.
_PLANNED = _cpu.PLANNED


def linear(x, weight, bias=None, *, in_mask=None, out_mask=None, count=True, backend=None):
    """``Y = M_out ⊙ ((M_in ⊙ X) Wᵀ + b)``.

    Args:
        x: (..., K) input rows.
        weight: (N, K). bias: (N,) or None.
        in_mask: bool, broadcastable to ``x`` (e.g. (K,) for a mask shared by all rows).
        out_mask: bool, broadcastable to (..., N); dropped outputs are zero.
        count: compute the executed MACs; ``False`` returns ``(Y, None)`` and saves the work.
        backend: backend name; ``None`` lets the dispatcher choose.
    """
    fast = _PLANNED.get("linear")
    if fast is not None and not torch.compiler.is_dynamo_compiling():
        served = fast(x, weight, bias, in_mask, out_mask, count, backend)
        if served is not None:  # a signature checked before and given to the cpu backend
            return served
    signature = _signature("linear", backend, (), x, weight, bias, in_mask, out_mask)
    served_by = planned(signature)
    if served_by is None:  # a new signature: check the operands, choose, remember
        case = linear_case(x, weight, bias, in_mask=in_mask, out_mask=out_mask)
        served_by = remember(signature, choose(case, backend))
        if signature is not None and served_by.plan is not None:
            served_by.plan("linear", x, weight, bias, in_mask, out_mask, backend)
    return served_by.ops["linear"](x, weight, bias, in_mask=in_mask, out_mask=out_mask, count=count)


def linear_case(x, weight, bias=None, *, in_mask=None, out_mask=None) -> Case:
    """Validate :func:`linear`'s operands and describe the call for the dispatcher."""
    _check_float("x", x)
    _check_operand("weight", weight, x, ndim=2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x has shape {tuple(x.shape)} but weight {tuple(weight.shape)} "
            f"expects {weight.shape[1]} input features"
        )
    if bias is not None:
        _check_operand("bias", bias, x, ndim=1, size=weight.shape[0])
    _check_mask("in_mask", in_mask, x, tuple(x.shape))
    _check_mask("out_mask", out_mask, x, (*x.shape[:-1], weight.shape[0]))
    return _case(
        "linear", (x, weight, bias), x=x, weight=weight, in_mask=in_mask, out_mask=out_mask
    )


def conv2d(
    x,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    in_mask=None,
    count=True,
    backend=None,
):
    """``Y = conv2d(M ⊙ X, W) + b`` with :func:`torch.nn.functional.conv2d`'s arguments.

    Args:
        x: (B, C_in, H, W). weight: (C_out, C_in / groups, kh, kw). bias: (C_out,) or None.
        in_mask: bool, broadcastable to ``x``: (B, C, H, W) element, (B, C, 1, 1) channel,
            (B, 1, H, W) spatial, (1, C, 1, 1) batch-shared.
        count: compute the executed MACs; ``False`` returns ``(Y, None)``.
    """
    fast = _PLANNED.get("conv2d")
    if fast is not None and not torch.compiler.is_dynamo_compiling():
        served = fast(x, weight, bias, stride, padding, dilation, groups, in_mask, count, backend)
        if served is not None:
            return served
    params = (stride, padding, dilation, groups)
    signature = _signature("conv2d", backend, params, x, weight, bias, in_mask)
    served_by = planned(signature)
    if served_by is None:
        case = conv2d_case(x, weight, bias, *params, in_mask=in_mask)
        served_by = remember(signature, choose(case, backend))
        if signature is not None and served_by.plan is not None:
            served_by.plan("conv2d", x, weight, bias, *params, in_mask, backend)
    return served_by.ops["conv2d"](
        x, weight, bias, stride, padding, dilation, groups, in_mask=in_mask, count=count
    )


def conv2d_case(
    x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, in_mask=None
) -> Case:
    """Validate :func:`conv2d`'s operands and describe the call for the dispatcher."""
    _check_float("x", x)
    _check_operand("weight", weight, x, ndim=4)
    if x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"conv2d: x has shape {tuple(x.shape)} but weight {tuple(weight.shape)} with "
            f"groups={groups} expects (B, {weight.shape[1] * groups}, H, W)"
        )
    if bias is not None:
        _check_operand("bias", bias, x, ndim=1, size=weight.shape[0])
    _check_mask("in_mask", in_mask, x, tuple(x.shape))
    return _case(
        "conv2d",
        (x, weight, bias),
        x=x,
        weight=weight,
        in_mask=in_mask,
        params=(
            _pair(stride),
            padding if isinstance(padding, str) else _pair(padding),
            _pair(dilation),
            (groups,),
        ),
    )


def attention_values(probs, v, *, key_mask=None, renormalize=True, count=True, backend=None):
    """``O = P' V`` where ``P'`` keeps the probabilities ``key_mask`` marks.

    Args:
        probs: (..., L_q, L_k) attention probabilities. v: (..., L_k, D), same leading dims.
        key_mask: bool, broadcastable to ``probs``: which keys each query sums.
        renormalize: rescale the kept probabilities of each query to sum to one.
        count: compute the executed MACs; ``False`` returns ``(O, None)``.
    """
    signature = _signature("attention_values", backend, (), probs, v, None, key_mask)
    served_by = planned(signature)
    if served_by is None:
        case = attention_values_case(probs, v, key_mask=key_mask)
        served_by = remember(signature, choose(case, backend))
    return served_by.ops["attention_values"](
        probs, v, key_mask=key_mask, renormalize=renormalize, count=count
    )


def attention_values_case(probs, v, *, key_mask=None) -> Case:
    """Validate :func:`attention_values`'s operands and describe the call for the dispatcher."""
    _check_float("probs", probs)
    _check_operand("v", v, probs, ndim=probs.dim())
    if probs.dim() < 2 or probs.shape[:-2] != v.shape[:-2] or probs.shape[-1] != v.shape[-2]:
        raise ValueError(
            f"attention_values: probs {tuple(probs.shape)} and v {tuple(v.shape)} do not match; "
            "expected (..., L_q, L_k) and (..., L_k, D)"
        )
    _check_mask("key_mask", key_mask, probs, tuple(probs.shape))
    return _case("attention_values", (probs, v), probs=probs, v=v, key_mask=key_mask)


def why_not(backend: str, case: Case) -> str | None:
    """``None`` if ``backend`` can serve ``case`` (from :func:`linear_case` and the like), else
    the reason it cannot."""
    return BACKENDS[backend].why_not(case)


def _signature(op, requested, params, x, weight, bias, mask, other_mask=None) -> tuple | None:
    """Everything the operand checks and the choice of backend depend on (op, requested backend
    or ``SELACT_BACKEND``, settings, whether gradients are needed, each operand's shape, dtype and
    device): calls of one signature are checked once (:func:`selact.mgemm.registry.remember`).
    ``None`` where a call is checked every time: under ``torch.compile`` (traced once anyway),
    operands that are not tensors, settings that are not hashable."""
    if torch.compiler.is_compiling():
        return None
    try:
        if params:
            hash(params)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        return (
            op,
            requested or os.environ.get(ENV_VAR),
            params,
            grad,
            x.shape,
            x.dtype,
            x.device,
            weight.shape,
            weight.dtype,
            weight.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device),
            None if mask is None else (mask.shape, mask.dtype, mask.device),
            None if other_mask is None else (other_mask.shape, other_mask.dtype, other_mask.device),
        )
    except (AttributeError, TypeError):
        return None


def _case(op, operands, **tensors) -> Case:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in operands
    )
    x = operands[0]
    shapes = {k: (tuple(t.shape) if isinstance(t, torch.Tensor) else t) for k, t in tensors.items()}
    return Case(op, x.device.type, x.dtype, shapes, needs_grad)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_operand(name, t, x, *, ndim, size=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim or (size is not None and t.shape[0] != size):
        want = f"{ndim}-D" + (f" of size {size}" if size is not None else "")
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input has {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")


def _check_mask(name, mask, x, target: tuple[int, ...]) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor, got {got}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but the input is on {x.device}")
    shape = tuple(mask.shape)  # broadcastable: right-aligned sizes equal or 1 (checked by hand:
    # torch.broadcast_shapes costs more than the rest of a small layer's dispatch)
    if len(shape) > len(target) or any(
        m not in (1, t) for m, t in zip(reversed(shape), reversed(target), strict=False)
    ):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {target}")
