"""Tables and plots of sweep rows: accuracy against executed MACs, and the frontier.

:func:`summarize` groups rows that differ only by seed (mean ± sample std over seeds);
:func:`frontier` finds the lowest executed/dense MAC fraction whose fine-tuned accuracy is within
a tolerance of dense, choosing on validation accuracy and reporting test accuracy;
:func:`markdown` writes both as a Markdown section; :func:`plot` draws test top-1 against
executed/dense MACs, a line per strategy, granularity and allocation, dense and zero-skipping
marked (matplotlib, optional).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Group", "frontier", "load_rows", "markdown", "plot", "summarize"]


def load_rows(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The rows of every sweep JSON file given, in order."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of sweep rows")
        rows += data
    return rows


@dataclasses.dataclass(frozen=True)
class Group:
    """Rows that differ only by seed, summarised."""

    model: str
    strategy: str
    granularity: str | None
    allocation: str | None
    target: float | None
    finetune_epochs: int
    seeds: tuple[int, ...]
    top1: tuple[float, float]  # test, mean and std (std 0 for one seed)
    top1_flip: tuple[float, float] | None
    val_top1: tuple[float, float]
    executed: float  # executed/dense MACs on test, mean over seeds
    zero_skip: float
    executed_over_zero_skip: float
    rows: tuple[dict[str, Any], ...] = dataclasses.field(repr=False, compare=False)

    @property
    def label(self) -> str:
        if self.strategy in ("dense", "zero_skip"):
            return self.strategy
        return f"{self.strategy} {self.granularity} {self.allocation}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _key(row: dict[str, Any]) -> tuple:
    target = row.get("target_mac_fraction")
    return (
        row["model"],
        row["strategy"],
        row.get("granularity"),
        row.get("allocation"),
        None if target is None else round(float(target), 4),
        int(row.get("finetune_epochs") or 0),
    )


def summarize(rows: Iterable[dict[str, Any]]) -> list[Group]:
    """Groups of rows that differ only by seed, in first-appearance order."""
    buckets: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        buckets.setdefault(_key(row), []).append(row)
    groups = []
    for key, members in buckets.items():
        flips = [r["top1_flip"] for r in members if r.get("top1_flip") is not None]
        groups.append(
            Group(
                model=key[0],
                strategy=key[1],
                granularity=key[2],
                allocation=key[3],
                target=key[4],
                finetune_epochs=key[5],
                seeds=tuple(int(r.get("seed", 0)) for r in members),
                top1=_mean_std([r["top1"] for r in members]),
                top1_flip=_mean_std(flips) if len(flips) == len(members) else None,
                val_top1=_mean_std([r["val_top1"] for r in members]),
                executed=statistics.fmean(r["executed_mac_fraction"] for r in members),
                zero_skip=statistics.fmean(r["zero_skip_mac_fraction"] for r in members),
                executed_over_zero_skip=statistics.fmean(
                    r["executed_over_zero_skip"] for r in members
                ),
                rows=tuple(members),
            )
        )
    return groups


def _dense(groups: Sequence[Group], model: str) -> Group | None:
    return next(
        (g for g in groups if g.model == model and g.strategy == "dense" and not g.finetune_epochs),
        None,
    )


#: Seeds a frontier point needs (the issue's "at least 3 seeds"); points with fewer are named as
#: lower candidates beside it.
FRONTIER_SEEDS = 3


def frontier(
    groups: Sequence[Group],
    model: str,
    strategy: str,
    tolerance: float,
    *,
    min_seeds: int = 1,
) -> Group | None:
    """The fine-tuned group of ``strategy`` with the lowest executed/dense MACs whose mean *val*
    top-1 is within ``tolerance`` (a fraction: 0.003 is 0.3 pt) of the dense model's val top-1,
    among groups with at least ``min_seeds`` distinct seeds; ``None`` if none qualifies."""
    dense = _dense(groups, model)
    if dense is None:
        return None
    ok = [
        g
        for g in groups
        if g.model == model
        and g.strategy == strategy
        and g.finetune_epochs > 0
        and len(set(g.seeds)) >= min_seeds
        and g.val_top1[0] >= dense.val_top1[0] - tolerance
    ]
    return min(ok, key=lambda g: g.executed) if ok else None


def _pct(value: tuple[float, float] | None, n: int) -> str:
    if value is None:
        return ""
    mean, std = value
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def _described(group: Group, dense: Group) -> str:
    n = len(group.seeds)
    return (
        f"{group.granularity} {group.allocation} at executed/dense {group.executed:.3f} "
        f"(executed/zero-skip {group.executed_over_zero_skip:.3f}, {group.finetune_epochs} "
        f"fine-tuning epochs): test top-1 {_pct(group.top1, n)} % over {n} seed(s), "
        f"dense {100 * dense.top1[0]:.2f} %"
    )


def _provenance(rows: Sequence[dict[str, Any]]) -> str:
    """Where a model's rows come from: one line for one run, else a line per run (scale,
    hardware, commit, date and command differ between runs merged into one report)."""

    def run(r: dict[str, Any]) -> str:
        return (
            f"Scale `{r.get('scale')}`, {r.get('hardware')}, commit "
            f"`{str(r.get('commit'))[:12]}`, {r.get('date', '')[:10]}. "
            f"Command: `{r.get('command') or 'selact sweep'}`."
        )

    runs = Counter(run(r) for r in rows)
    if len(runs) == 1:
        return f"{next(iter(runs))}\n"
    lines = [f"- {n} row{'s' if n > 1 else ''}: {text}" for text, n in runs.items()]
    return "Rows from several runs:\n\n" + "\n".join(lines) + "\n"


def markdown(rows: Sequence[dict[str, Any]], *, tolerance: dict[str, float] | None = None) -> str:
    """A Markdown section per model: the dense baseline, every group, the frontier."""
    tolerance = tolerance or {}
    groups = summarize(rows)
    parts = []
    for model in dict.fromkeys(g.model for g in groups):
        mine = [g for g in groups if g.model == model]
        dense = _dense(mine, model)
        parts.append(f"### {model}\n")
        parts.append(_provenance([r for g in mine for r in g.rows]))
        if dense is not None:
            d = dense.rows[0]
            epochs = d.get("dense_epochs_done")
            seconds = d.get("dense_train_seconds")
            best = d.get("dense_best_epoch")
            parts.append(
                f"Dense: test top-1 {100 * d['top1']:.2f} % "
                f"(with flip TTA {100 * d.get('top1_flip', float('nan')):.2f} %), val "
                f"{100 * d['val_top1']:.2f} %"
                + (f", {epochs:.0f} epochs" if epochs else "")
                + (f" in {seconds:.0f} s" if seconds else "")
                + (f", the weights of epoch {best} (best on val)" if best else "")
                + ".\n"
            )
        head = (
            "| strategy | granularity | allocation | target | FT epochs | seeds | exec/dense "
            "| zs/dense | exec/zs | test top-1 % | flip TTA % | val top-1 % |"
        )
        lines = [head, "|" + "---|" * 12]
        for g in sorted(
            mine,
            key=lambda g: (
                g.finetune_epochs > 0,
                g.strategy not in ("dense", "zero_skip"),
                g.strategy,
                str(g.granularity),
                str(g.allocation),
                -(g.target or 2.0),
            ),
        ):
            n = len(g.seeds)
            lines.append(
                f"| {g.strategy} | {g.granularity or ''} | {g.allocation or ''} "
                f"| {_fmt(g.target)} | {g.finetune_epochs} | {n} | {g.executed:.3f} "
                f"| {g.zero_skip:.3f} | {g.executed_over_zero_skip:.3f} | {_pct(g.top1, n)} "
                f"| {_pct(g.top1_flip, n)} | {_pct(g.val_top1, n)} |"
            )
        parts.append("\n".join(lines) + "\n")
        strategies = sorted({g.strategy for g in mine if g.finetune_epochs and g.allocation})
        for strategy in strategies:
            tol = tolerance.get(model, 0.003)
            head = f"Frontier ({strategy}, within {100 * tol:.1f} pt of dense on val, "
            best = frontier(mine, model, strategy, tol, min_seeds=FRONTIER_SEEDS)
            if best is None:
                line = f"{head}{FRONTIER_SEEDS} seeds): no fine-tuned setting qualifies."
            else:
                line = f"{head}{FRONTIER_SEEDS} seeds): {_described(best, dense)}."
            lower = frontier(mine, model, strategy, tol)
            if lower is not None and (best is None or lower.executed < best.executed):
                line += f" Lower, with fewer seeds: {_described(lower, dense)}."
            parts.append(line + "\n")
    return "\n".join(parts)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Test top-1 against executed/dense MACs: one panel per model and fine-tuning state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summarize(rows)
    models = list(dict.fromkeys(g.model for g in groups))
    fig, axes = plt.subplots(
        len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False, sharey="row"
    )
    for i, model in enumerate(models):
        mine = [g for g in groups if g.model == model]
        dense = _dense(mine, model)
        zero_skip = next((g for g in mine if g.strategy == "zero_skip"), None)
        for j, tuned in enumerate((False, True)):
            ax = axes[i][j]
            lines: dict[str, list[Group]] = {}
            for g in mine:
                if g.strategy in ("dense", "zero_skip") or (g.finetune_epochs > 0) != tuned:
                    continue
                lines.setdefault(g.label, []).append(g)
            for label, members in sorted(lines.items()):
                members.sort(key=lambda g: g.executed)
                ax.errorbar(
                    [g.executed for g in members],
                    [100 * g.top1[0] for g in members],
                    yerr=[100 * g.top1[1] for g in members],
                    marker="o",
                    markersize=4,
                    capsize=3,
                    label=label,
                )
            if dense is not None:
                ax.axhline(100 * dense.top1[0], color="black", linestyle="--", linewidth=1)
                ax.plot([1.0], [100 * dense.top1[0]], "k*", markersize=12, label="dense")
            if zero_skip is not None:
                ax.plot(
                    [zero_skip.executed],
                    [100 * zero_skip.top1[0]],
                    "kD",
                    markersize=7,
                    label="zero-skipping",
                )
            control = [g for g in mine if g.strategy == "dense" and g.finetune_epochs > 0]
            if tuned and control:
                c = control[0]
                ax.errorbar(
                    [1.0],
                    [100 * c.top1[0]],
                    yerr=[100 * c.top1[1]],
                    fmt="s",
                    color="gray",
                    capsize=3,
                    label=f"dense fine-tuned ({c.finetune_epochs} ep)",
                )
            ax.set_title(f"{model}: {'fine-tuned' if tuned else 'no fine-tuning'}")
            ax.set_xlabel("executed / dense MACs")
            ax.set_ylabel("test top-1 %")
            ax.grid(alpha=0.3)
            if dense is not None:
                ax.set_ylim(max(0.0, 100 * dense.top1[0] - 25), 100 * dense.top1[0] + 3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
