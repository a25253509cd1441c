"""Backend records and the dispatcher: argument > ``SELACT_BACKEND`` > device default > reference.

A backend asked for by name (argument or environment) that cannot serve a case raises
:class:`BackendError`; only the automatic choice falls back, with a one-time warning.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from selact._registry import Registry

ENV_VAR = "SELACT_BACKEND"


class BackendError(RuntimeError):
    """A backend named by the user cannot serve the requested case."""


class Case(NamedTuple):
    """What a backend needs to know to say whether it can serve a call (a named tuple: one is
    made per call, and a frozen dataclass costs microseconds to build)."""

    op: str
    device: str
    dtype: torch.dtype
    shapes: Mapping[str, tuple[int, ...] | None]
    needs_grad: bool


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of some MGEMM ops.

    Args:
        name: registry key, also what ``SELACT_BACKEND`` and ``backend=`` take.
        devices: device types it runs on (``"cpu"``, ``"cuda"``).
        dtypes: input dtypes it accepts.
        ops: op name -> function with the public op's signature (minus ``backend``).
        priority: automatic choice tries higher priorities first.
        auto_devices: device types where the automatic choice may pick it (default: all of
            ``devices``); elsewhere it serves only when named, e.g. where it was measured slower
            than the reference, or under Triton's interpreter.
        check: optional ``Case -> reason or None`` for limits beyond device and dtype.
        differentiable: whether its results carry gradients.
        plan: optional ``plan(op, *operands, requested)``, told the operands of each call
            signature that the dispatcher gives this backend, so that the backend can serve later
            calls of the signature on its own (the ``cpu`` backend: without any Python).
    """

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    ops: Mapping[str, Callable]
    priority: int = 1
    auto_devices: frozenset[str] | None = None
    check: Callable[[Case], str | None] | None = None
    differentiable: bool = True
    plan: Callable[..., None] | None = None

    def why_not(self, case: Case) -> str | None:
        """``None`` if this backend can serve ``case``, else the reason it cannot."""
        if case.op not in self.ops:
            return f"it does not implement {case.op}"
        if case.device not in self.devices:
            return f"it does not run on {case.device} (runs on {', '.join(sorted(self.devices))})"
        if case.dtype not in self.dtypes:
            return f"it does not support {case.dtype}"
        if case.needs_grad and not self.differentiable:
            return "it is inference-only and the inputs require grad"
        return self.check(case) if self.check is not None else None


BACKENDS: Registry[Backend] = Registry("MGEMM backend")
_warned: set[tuple[str, str, torch.dtype]] = set()
#: Backends of call signatures already checked and served (see :func:`remember`).
_plans: dict[tuple, Backend] = {}
#: Signatures kept at most: shapes vary without bound in some models; the cache stays small.
MAX_PLANS = 4096


#: Called by :func:`forget_plans`: backends that keep their own plans (``Backend.plan``) drop them.
PLAN_LISTENERS: list[Callable[[], None]] = []


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (a backend module calls this when imported)."""
    BACKENDS.register(backend.name)(backend)
    forget_plans()
    return backend


def forget_plans() -> None:
    """Forget every call signature's backend, here and in the backends that keep their own plans:
    each signature is checked and given a backend again on its next call (after the registry
    changes)."""
    _plans.clear()
    for forget in PLAN_LISTENERS:
        forget()


def planned(signature: tuple | None) -> Backend | None:
    """The backend remembered for calls of ``signature`` (:func:`remember`), else None."""
    return _plans.get(signature)


def remember(signature: tuple | None, backend: Backend) -> Backend:
    """Remember that calls of ``signature`` (see :func:`selact.mgemm._signature`; ``None``: do
    not) were checked and are served by ``backend``; the public ops look it up before checking.
    A layer calls with one signature every time, and the checks cost more than the kernel:
    6 us warm, 25-60 us when the previous layer has evicted Python's own data from the caches
    (measured on 2 Xeon cores, against a 60-us masked linear kernel)."""
    if signature is not None:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[signature] = backend
    return backend


def choose(case: Case, requested: str | None = None) -> Backend:
    """The backend that serves ``case``."""
    name = requested or os.environ.get(ENV_VAR) or None
    if name is not None:
        try:
            backend = BACKENDS[name]
        except KeyError as error:
            raise BackendError(str(error.args[0])) from None
        reason = backend.why_not(case)
        if reason is not None:
            raise BackendError(
                f"backend {name!r} cannot serve {case.op} on {case.device} {case.dtype}: {reason}"
            )
        return backend
    return _choose_automatically(case)


def _choose_automatically(case: Case) -> Backend:
    candidates = sorted(
        (BACKENDS[n] for n in BACKENDS if n != "reference"),
        key=lambda b: -b.priority,
    )
    # Training on an inference-only backend's device is normal: the reference serves it.
    candidates = [
        b
        for b in candidates
        if case.device in (b.devices if b.auto_devices is None else b.auto_devices)
        and case.op in b.ops
        and (b.differentiable or not case.needs_grad)
    ]
    reasons = []
    for backend in candidates:
        reason = backend.why_not(case)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    key = (case.op, case.device, case.dtype)
    # Training is the reference backend's job (fast backends may be inference-only): no warning.
    if reasons and not case.needs_grad and key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"selact: no fast backend serves {case.op} on {case.device} {case.dtype} "
            f"({'; '.join(reasons)}); using the reference backend",
            stacklevel=_outside_mgemm(),
        )
    return BACKENDS["reference"]


def _outside_mgemm() -> int:
    """The ``stacklevel`` of the innermost caller outside this package: where a warning about a
    call belongs."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("selact.mgemm"):
        frame, level = frame.f_back, level + 1
    return level
