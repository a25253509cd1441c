"""Frozen configuration of a selective layer, and per-layer overrides by name or regex."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

GRANULARITIES = ("element", "block", "channel", "spatial", "batch_shared")
BUDGETS = ("topk", "threshold")

Granularity = Literal["element", "block", "channel", "spatial", "batch_shared"]
Budget = Literal["topk", "threshold"]


@dataclasses.dataclass(frozen=True)
class SelectiveConfig:
    """How one layer chooses and multiplies its inputs.

    Args:
        strategy: AMU strategy that scores inputs: ``"sapi"`` (|x|), ``"sapw"`` (|x| times the
            norm of the weights the input feeds), or a baseline ``"dense"``, ``"zero_skip"``,
            ``"random"``. Any name registered with :func:`selact.amu.register_strategy`.
        density: fraction of the layer's inputs the mask keeps, counted over all inputs (zeros
            included), in (0, 1]. At 1.0 the layer equals its dense original.
        granularity: unit that is kept or dropped together: ``"element"``, ``"block"`` (``block``
            consecutive inputs of a row; for a convolution, consecutive channels at one position),
            ``"channel"``, ``"spatial"``, or ``"batch_shared"`` (one mask over the reduction
            inputs for every row of the batch). See docs/method.md.
        budget: ``"topk"`` keeps exactly ceil(density * n) units per row or sample;
            ``"threshold"`` keeps the units whose score exceeds a threshold fitted by
            :func:`selact.calibrate`, so the mean density is ``density``.
        block: block size G for ``granularity="block"``.
        key_density: for selective attention only: keep this fraction of the keys per query
            (largest attention probabilities, renormalised); ``None`` keeps all keys.
        counting: accumulate MAC and density statistics (a few tensor ops per call: at batch 1
            on the CPU more than a small layer's kernel; off for latency).
        check_finite: raise if a layer's input holds NaN or inf (forces a device sync).
        backend: MGEMM backend name; ``None`` lets the dispatcher choose.
    """

    strategy: str = "sapi"
    density: float = 0.5
    granularity: Granularity = "element"
    budget: Budget = "topk"
    block: int = 8
    key_density: float | None = None
    counting: bool = True
    check_finite: bool = True
    backend: str | None = None

    def __post_init__(self) -> None:
        from selact.amu.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; known: {', '.join(STRATEGIES.names())}"
            )
        _check_density("density", self.density)
        if self.key_density is not None:
            _check_density("key_density", self.key_density)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}"
            )
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; known: {', '.join(BUDGETS)}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive integer, got {self.block!r}")

    def replace(self, **fields: Any) -> SelectiveConfig:
        """A copy with ``fields`` changed (validated like a new config)."""
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectiveConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SelectiveConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_density(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{field} must be in (0, 1], got {value!r}")


Override = SelectiveConfig | Mapping[str, Any] | None


def resolve_config(
    name: str, default: SelectiveConfig, overrides: Mapping[str, Override] | None
) -> SelectiveConfig | None:
    """The config for layer ``name``; ``None`` means the layer stays dense.

    Precedence: an exact key equal to ``name``; else the first key of the form ``"re:<regex>"``
    (in the mapping's order) whose regex fully matches ``name``; else ``default``. A value may be a
    :class:`SelectiveConfig`, a mapping of fields to change on ``default``, or ``None`` (skip).
    """
    if not overrides:
        return default
    if name in overrides:
        return _apply(default, overrides[name])
    for key, value in overrides.items():
        if not key.startswith("re:"):
            continue
        try:
            matched = re.fullmatch(key[3:], name)
        except re.error as error:
            raise ValueError(
                f"override {key!r} is not a valid regular expression: {error}"
            ) from None
        if matched:
            return _apply(default, value)
    return default


def _apply(default: SelectiveConfig, value: Override) -> SelectiveConfig | None:
    if value is None or isinstance(value, SelectiveConfig):
        return value
    if isinstance(value, Mapping):
        return default.replace(**value)
    raise TypeError(
        f"an override must be a SelectiveConfig, a mapping of fields or None, got {type(value)}"
    )
