"""AMU strategies: each scores a layer's inputs; :func:`selact.amu.select` turns scores into masks.

Strategies never multiply. Register a new one with ``@register_strategy("name")`` on a
:class:`Strategy` subclass.
"""

from __future__ import annotations

import torch

from selact._registry import Registry


class Strategy:
    """Scores inputs (larger = more important). ``uses_weight`` says whether it needs weight norms."""

    uses_weight = False
    #: ``False`` for strategies whose mask does not depend on the density (dense, zero-skipping).
    uses_budget = True

    def scores(self, x: torch.Tensor, input_norms: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def fixed_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask of a strategy with ``uses_budget = False`` (``None`` keeps everything)."""
        return None


STRATEGIES: Registry[Strategy] = Registry("strategy")


def register_strategy(name: str):
    """Class decorator: registers an instance of the decorated :class:`Strategy` under ``name``."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        STRATEGIES.register(name)(cls())
        return cls

    return add


@register_strategy("sapi")
class SAPI(Strategy):
    """Selective activation with primary inputs: ``score = |x|``."""

    def scores(self, x, input_norms):
        return x.abs()


@register_strategy("sapw")
class SAPW(Strategy):
    """Selective activation with primary weights: ``score = |x| · ‖W[:, i]‖₂``."""

    uses_weight = True

    def scores(self, x, input_norms):
        return x.abs() * input_norms.to(x.dtype)


@register_strategy("random")
class RandomMask(Strategy):
    """Baseline: uniformly random scores, so a random mask of the same density."""

    def scores(self, x, input_norms):
        return torch.rand(x.shape, device=x.device, dtype=torch.float32)


@register_strategy("dense")
class Dense(Strategy):
    """Baseline: keep every input."""

    uses_budget = False


@register_strategy("zero_skip")
class ZeroSkip(Strategy):
    """Baseline: keep exactly the nonzero inputs (the free sparsity of ReLU)."""

    uses_budget = False

    def fixed_mask(self, x):
        return x != 0
