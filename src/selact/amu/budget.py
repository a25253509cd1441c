"""Per-layer budgets: share a global target of executed MACs out across layers.

:func:`budget_search` is a greedy search by sensitivity (as TEAL does for LLM activations): all
selective layers start at the density where they keep every nonzero input (no loss, the
zero-skipping cost), and each step lowers the density of the one layer whose cut costs the least
added distance to the dense model's outputs per MAC saved. Every step saves about the same
fraction of the model's MACs (``mac_step``), so big and small layers compete on equal terms. The
distance is measured on calibration batches (the project uses validation images; never test
images) by ``sensitivity(outputs, dense_outputs)``, default the mean squared error. One search
serves several targets: it records the allocation at which the measured executed/dense fraction
first falls to each target.

:func:`uniform_search` finds the one density for every layer that meets a target, by bisection.

Both return :class:`BudgetResult`; ``result.overrides()`` is the ``overrides`` mapping for
:func:`selact.sparsify`, and :func:`apply_densities` sets densities on a converted model in place.
Unlike the rest of :mod:`selact.amu`, these functions run the model (they measure), so they import
:mod:`selact.nn` lazily.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BudgetResult", "apply_densities", "budget_search", "uniform_search"]

log = logging.getLogger(__name__)

Sensitivity = Callable[[Any, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BudgetResult:
    """One allocation: per-layer densities and what they measured on the calibration batches.

    Attributes:
        target: the executed/dense MAC fraction asked for.
        densities: density of each selective layer, by layer name.
        executed_fraction: executed/dense MACs of the whole model on the calibration batches.
        sensitivity: distance to the dense model's outputs (mean over batches).
        allocation: ``"global"`` (greedy search) or ``"uniform"`` (one density).
        evaluations: forward passes over the calibration batches that the search took.
    """

    target: float
    densities: dict[str, float]
    executed_fraction: float
    sensitivity: float
    allocation: str
    evaluations: int = 0

    def overrides(self) -> dict[str, dict[str, float]]:
        """``{layer name: {"density": d}}``, for ``selact.sparsify(..., overrides=...)``."""
        return {name: {"density": d} for name, d in self.densities.items()}

    def mean_density(self) -> float:
        """The plain mean of the per-layer densities."""
        return sum(self.densities.values()) / max(1, len(self.densities))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _mse(outputs: Any, reference: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return (outputs.float() - reference.float()).pow(2).mean()
    if isinstance(outputs, dict):
        return sum(_mse(outputs[k], reference[k]) for k in sorted(outputs)) / len(outputs)
    if isinstance(outputs, list | tuple):
        return sum(_mse(a, b) for a, b in zip(outputs, reference, strict=True)) / len(outputs)
    raise TypeError(f"cannot compare outputs of type {type(outputs).__name__}")


class _Probe:
    """Runs the calibration batches with given densities; measures MACs and sensitivity."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], sensitivity: Sensitivity):
        from selact.nn.base import SelectiveModule

        self.model, self.batches, self.sensitivity = model, list(batches), sensitivity
        if not self.batches:
            raise ValueError("budget search: batches is empty")
        self.layers = {
            m.layer_name: m
            for m in model.modules()
            if isinstance(m, SelectiveModule) and m.kind != "attention"
        }
        if not self.layers:
            raise ValueError("the model has no selective layers: call selact.sparsify first")
        self.original = {name: m.config for name, m in self.layers.items()}
        self.evaluations = 0
        self.reference = None
        self.nonzero: dict[str, float] = {}
        self.dense_macs: dict[str, int] = {}
        self.model_dense_macs = 0

    def set(self, densities: dict[str, float]) -> None:
        for name, layer in self.layers.items():
            layer.config = self.original[name].replace(
                density=min(1.0, densities[name]), counting=True, check_finite=False
            )

    def restore(self) -> None:
        for name, layer in self.layers.items():
            layer.config = self.original[name]

    @torch.no_grad()
    def run(self, densities: dict[str, float], observe: bool = False) -> tuple[float, float]:
        """(executed/dense fraction, mean sensitivity) at ``densities``."""
        from selact.nn.stats import collect, reset

        self.set(densities)
        reset(self.model)
        hooks, counts = [], {}
        if observe:
            for name, layer in self.layers.items():
                counts[name] = [0, 0]

                def hook(module, args, name=name):
                    x = args[0]
                    counts[name][0] += int((x != 0).sum())
                    counts[name][1] += x.numel()

                hooks.append(layer.register_forward_pre_hook(hook))
        outputs, distance = [], 0.0
        try:
            for i, item in enumerate(self.batches):
                out = _forward(self.model, item)
                if self.reference is None:
                    outputs.append(out)
                else:
                    distance += float(self.sensitivity(out, self.reference[i]))
        finally:
            for h in hooks:
                h.remove()
        self.evaluations += 1
        if self.reference is None:
            self.reference = outputs
        stats = collect(self.model)
        if observe:
            self.nonzero = {n: c[0] / max(1, c[1]) for n, c in counts.items()}
            self.dense_macs = {n: stats.layers[n].dense_macs for n in self.layers}
            self.model_dense_macs = stats.total.dense_macs
        reset(self.model)
        return stats.total.executed_fraction, distance / len(self.batches)


def _forward(model: nn.Module, item: Any) -> Any:
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, tuple | list):
        return model(*item)
    return model(item)


def _prepare(model, batches, sensitivity) -> tuple[_Probe, dict[str, float], float, float]:
    """A probe with the dense reference taken; the start densities (every nonzero input kept)."""
    probe = _Probe(model, batches, sensitivity or _mse)
    dense = {name: 1.0 for name in probe.layers}
    probe.run(dense, observe=True)  # the reference outputs and each layer's nonzero fraction
    # Element masks keep nonzero inputs first: down to the nonzero fraction nothing is saved and
    # (nearly) nothing lost, so the search starts there. Coarser units mix zeros and nonzeros.
    start = {
        name: min(1.0, math.ceil(nz * 1000) / 1000)
        if probe.original[name].granularity == "element"
        else 1.0
        for name, nz in probe.nonzero.items()
    }
    executed, distance = probe.run(start)
    return probe, start, executed, distance


def budget_search(
    model: nn.Module,
    batches: Iterable[Any],
    targets: float | Sequence[float],
    *,
    sensitivity: Sensitivity | None = None,
    mac_step: float = 0.01,
    max_steps: int | None = None,
    max_density_step: float = 0.25,
    min_density: float = 0.02,
    deadline: float | None = None,
    refresh: int = 1,
) -> list[BudgetResult]:
    """Greedy per-layer densities meeting each executed/dense MAC target (see the module doc).

    Args:
        model: converted by :func:`selact.sparsify` with the strategy and granularity to search
            for (their densities are ignored; the model's configs are restored at the end).
        batches: calibration inputs; each item is passed as ``model(item)`` (a tuple or list as
            ``model(*item)``, a dict as ``model(**item)``). Use validation data.
        targets: executed/dense MAC fractions of the whole model (layers left dense count).
        sensitivity: ``f(outputs, dense_outputs) -> 0-dim tensor``; default mean squared error.
        mac_step: each step aims to save this fraction of the model's dense MACs.
        max_steps: if given, the step grows so that the search reaches the lowest target in
            about this many steps from where it starts (each step costs one pass over the
            batches per selective layer).
        max_density_step: the most one step may lower a layer's density.
        min_density: no layer goes below this density.
        deadline: a :func:`time.monotonic` time after which the search stops.
        refresh: measure every layer's next cut once every ``refresh`` steps (1: every step, the
            plain greedy search). In the steps between, the search is lazy (as CELF is): it
            re-measures the layer whose last measured score is best, and takes its cut if the
            fresh score still beats every other layer's last one; a layer just cut is
            re-measured before it competes again. Each lazy step costs a pass or two instead of
            one per layer; the scores it trusts are up to ``refresh - 1`` steps old.

    Returns:
        One :class:`BudgetResult` per target, in the order given. A target that cannot be met
        (every layer at ``min_density``, or the deadline passed) gets the lowest allocation
        reached, whose ``executed_fraction`` is then above the target, and a warning.
    """
    targets_list = [float(targets)] if isinstance(targets, int | float) else list(targets)
    if not targets_list or not all(0.0 < t <= 1.0 for t in targets_list):
        raise ValueError(f"targets must be fractions in (0, 1], got {targets_list}")
    if refresh < 1:
        raise ValueError(f"refresh must be at least 1, got {refresh}")
    was_training = model.training
    model.eval()
    probe, densities, executed, distance = _prepare(model, batches, sensitivity)
    model_dense = probe.model_dense_macs
    if max_steps:
        mac_step = max(mac_step, (executed - min(targets_list)) / max_steps)
    results: dict[float, BudgetResult] = {}

    def record(t: float) -> None:
        results[t] = BudgetResult(
            t, dict(densities), executed, distance, "global", probe.evaluations
        )

    scores: dict[str, float] = {}  # each layer's last measured score (lazy steps trust them)
    step = 0
    try:
        pending = sorted(set(targets_list), reverse=True)
        while pending:
            while pending and executed <= pending[0] + 1e-9:
                record(pending.pop(0))
            if not pending:
                break
            if deadline is not None and time.monotonic() > deadline:
                for t in pending:
                    log.warning("budget search: deadline passed before target %.4f", t)
                    record(t)
                break
            full = step % refresh == 0 or not scores
            best, moves = _best_move(
                probe, densities, executed, distance, scores, mac_step, model_dense,
                max_density_step, min_density, full,
            )  # fmt: skip
            step += 1
            if best is None:  # every layer at min_density
                for t in pending:
                    log.warning("budget search: target %.4f not reached (%.4f)", t, executed)
                    record(t)
                break
            if not math.isfinite(best[0]):  # no single move saves MACs: move every layer
                trial = {**densities, **moves}
                best = (0.0, trial, *probe.run(trial))
            moved = [name for name in densities if best[1][name] != densities[name]]
            _, densities, executed, distance = best
            for name in moved:
                scores.pop(name, None)  # its next cut is measured before it competes again
            log.debug("budget search: executed %.4f, sensitivity %.5f", executed, distance)
    finally:
        probe.restore()
        model.train(was_training)
    return [results[t] for t in targets_list]


def _best_move(
    probe, densities, executed, distance, scores, mac_step, model_dense, max_density_step,
    min_density, full,
):  # fmt: skip
    """The cut to take: ``(score, densities, executed, distance)`` or None (every layer at
    ``min_density``), and each layer's candidate density. ``full``: measure every layer's cut;
    else measure lazily from the best last score (see :func:`budget_search`'s ``refresh``)."""
    moves = {}
    for name in probe.layers:
        d = densities[name]
        if d <= min_density + 1e-9:
            scores.pop(name, None)
            continue
        step = mac_step * model_dense / max(1, probe.dense_macs[name])
        moves[name] = round(max(min_density, d - min(max_density_step, step)), 6)

    def measure(name):
        trial = {**densities, name: moves[name]}
        e, s = probe.run(trial)
        saved = executed - e
        score = (s - distance) / saved if saved > 1e-12 else math.inf
        scores[name] = score
        return score, trial, e, s

    if full:
        best = None
        for name in moves:
            candidate = measure(name)
            if best is None or candidate[0] < best[0]:
                best = candidate
        return best, moves
    while True:  # lazy: unmeasured layers first, then the best last score
        name = min(moves, key=lambda n: scores.get(n, -math.inf))
        candidate = measure(name)
        others = [scores.get(n, -math.inf) for n in moves if n != name]
        if not others or candidate[0] <= min(others):
            return candidate, moves


def uniform_search(
    model: nn.Module,
    batches: Iterable[Any],
    targets: float | Sequence[float],
    *,
    sensitivity: Sensitivity | None = None,
    iterations: int = 8,
    min_density: float = 0.01,
    deadline: float | None = None,
) -> list[BudgetResult]:
    """For each target, the one density for all selective layers whose executed/dense MAC
    fraction on ``batches`` is the largest not above the target (bisection to a bracket of
    ``2 ** -iterations``).

    Arguments as in :func:`budget_search`. Executed MACs fall as the density falls (top-k keeps
    a superset at a higher density), so the bisection is well posed. Targets not reached before
    ``deadline`` are left out of the result.
    """
    targets_list = [float(targets)] if isinstance(targets, int | float) else list(targets)
    probe = _Probe(model, batches, sensitivity or _mse)
    was_training = model.training
    model.eval()
    names = list(probe.layers)
    results = []
    try:
        probe.run(dict.fromkeys(names, 1.0))  # the dense reference
        cache: dict[float, tuple[float, float]] = {}

        def at(d: float) -> tuple[float, float]:
            if d not in cache:
                cache[d] = probe.run(dict.fromkeys(names, d))
            return cache[d]

        for t in targets_list:
            if deadline is not None and time.monotonic() > deadline:
                log.warning("uniform search: deadline passed before target %.4f", t)
                continue
            # The bracket [lo, hi]: executed(lo) <= t is assumed, executed(hi) may exceed t;
            # densities measured for earlier targets narrow it.
            lo = max([min_density] + [d for d, (e, _) in cache.items() if e <= t])
            hi = min([1.0] + [d for d, (e, _) in cache.items() if e > t])
            if at(hi)[0] <= t:
                lo = hi
            else:
                while hi - lo > 2.0**-iterations:
                    mid = round((lo + hi) / 2, 6)
                    if at(mid)[0] <= t:
                        lo = mid
                    else:
                        hi = mid
            e, s = at(lo)
            if e > t + 1e-9:
                log.warning("uniform search: target %.4f not reached (%.4f at %.3f)", t, e, lo)
            results.append(
                BudgetResult(t, dict.fromkeys(names, lo), e, s, "uniform", probe.evaluations)
            )
    finally:
        probe.restore()
        model.train(was_training)
    return results


def apply_densities(model: nn.Module, densities: dict[str, float]) -> nn.Module:
    """Set the density of each named selective layer of a converted model, in place."""
    from selact.nn.base import SelectiveModule

    layers = {m.layer_name: m for m in model.modules() if isinstance(m, SelectiveModule)}
    unknown = set(densities) - set(layers)
    if unknown:
        raise ValueError(f"no selective layers named {sorted(unknown)[:5]}")
    for name, d in densities.items():
        layers[name].config = layers[name].config.replace(density=d)
    return model


def read_densities(path: str | Path) -> dict[str, Any]:
    """``{"densities": {layer: density}, "densities_from": path, ...}`` from a ``finetune --json``
    result (its ``target_mac_fraction`` is kept) or a plain ``{layer: density}`` JSON file;
    ``ValueError`` naming the file where it holds no densities in (0, 1]."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read densities ({error})") from error
    layers = found.get("densities", found) if isinstance(found, dict) else None
    if not layers or not all(
        isinstance(d, int | float) and 0 < d <= 1 for d in layers.values()
    ):  # fmt: skip
        raise ValueError(
            f"{path}: expected {{layer: density in (0, 1]}} or a finetune result with 'densities'"
        )
    fields = {"densities": {k: float(v) for k, v in layers.items()}, "densities_from": str(path)}
    if "target_mac_fraction" in found:
        fields["target_mac_fraction"] = found["target_mac_fraction"]
    return fields
