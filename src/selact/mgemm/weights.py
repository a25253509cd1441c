"""Weights in the layouts kernels want, derived once per weight and redone when it changes."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

_cache: dict[tuple[int, str], tuple[weakref.ref, tuple, torch.Tensor]] = {}


def derived(weight: torch.Tensor, layout: str, make: Callable[[torch.Tensor], torch.Tensor]):
    """``make(weight)``, cached per (weight tensor, ``layout``).

    The cache entry is rebuilt when the weight changes: a new tensor, new storage, or an in-place
    update (which bumps ``weight._version``); it is dropped when the weight is freed.
    """
    key = (id(weight), layout)
    stamp = (weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == stamp:
        return entry[2]
    with torch.no_grad():
        value = make(weight.detach())
    _cache[key] = (weakref.ref(weight, lambda _: _cache.pop(key, None)), stamp, value)
    return value
