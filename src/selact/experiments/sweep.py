"""The accuracy-against-calculations sweep of one model on one task (``selact sweep``).

Steps, in the order they run (each result row is written as soon as it exists, so a run stopped
at any point keeps what it finished):

1. **dense**: train the model (or load ``dense_checkpoint``); rows ``dense`` (every MAC) and
   ``zero_skip`` (only nonzero inputs: ReLU's free sparsity).
2. **jobs**, in priority order, while the time budget allows:
   - *evaluation without fine-tuning*: for a (strategy, granularity, allocation), find the
     per-layer densities meeting each executed/dense MAC target on validation images
     (``uniform``: one density by bisection; ``global``: :func:`selact.amu.budget_search`), then
     evaluate each on val and test;
   - *fine-tuning*: mask-aware fine-tuning of the dense model converted at one target, one seed
     (distillation from the dense model, density schedule), then evaluation; and the *control*:
     the dense model fine-tuned with the same recipe and epochs.

Settings are chosen on ``val`` only (the budget searches measure validation images); ``test``
only reports. Seeds are fine-tuning seeds (data order, augmentation); one dense model per
architecture. Accuracy is computed with the reference MGEMM backend, which defines results.

Rows (a list, JSON): model, task, strategy (dense, zero_skip, sapi, sapw, random), granularity,
allocation (uniform, global), target_mac_fraction (the budget asked), target_density (the uniform
density, or the mean of the per-layer densities), densities (per layer), executed_mac_fraction and
zero_skip_mac_fraction (both of dense, on test), executed_over_zero_skip, top1 and top1_flip (test,
fractions), val_top1, val_top1_flip, val_executed_mac_fraction, calib_executed_mac_fraction (on
the search's images), finetune_epochs, seed, scale, hardware, command, checkpoint_sha256, commit,
date; fine-tuning rows add train_seconds and epochs_done.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selact
from selact._files import atomic_write_text
from selact.amu.budget import BudgetResult, apply_densities, budget_search, uniform_search
from selact.experiments.recipes import Recipe, recipe
from selact.models import create_model
from selact.train import (
    TaskOptions,
    TrainConfig,
    autocast,
    create_task,
    file_sha256,
    fit,
    hardware,
    load_model,
)
from selact.train.task import Task

__all__ = ["Eval", "Finetune", "SweepConfig", "default_out", "plan", "run_sweep"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Every setting of one sweep; the model's :class:`Recipe` supplies the rest."""

    task: str = "cifar10"
    model: str = "resnet20"
    scale: str = "full"  # "smoke", "cpu" or "full" (see selact.experiments.recipes)
    data: str | None = None  # data path; None: $SELACT_DATA, then the cache folder
    device: str = "auto"  # "auto": CUDA if present
    out: str | None = None  # rows JSON; default results/<task>/<model>.json (runs/ for smoke)
    run_dir: str | None = None  # checkpoints; default runs/sweep/<task>-<model>-<scale>
    dense_checkpoint: str | None = None  # reuse this dense model instead of training one
    time_budget: float | None = None  # seconds for the whole sweep (None: no limit)
    dense_share: float = 0.45  # of the time budget left after loading, for dense training
    seeds: tuple[int, ...] = (0, 1, 2)
    max_finetunes: int | None = None  # at most this many fine-tuning runs (None: all planned)
    mac_step: float = 0.01  # budget search: MAC fraction saved per greedy step (at least)
    command: str = ""
    commit: str | None = None  # None: $SELACT_COMMIT, then git
    progress: bool = False
    resume: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Eval:
    """Evaluate (strategy, granularity, allocation) at every target of the recipe, no training."""

    strategy: str
    granularity: str
    allocation: str


@dataclasses.dataclass(frozen=True)
class Finetune:
    """Fine-tune one conversion at one target and seed; ``strategy="dense"`` is the control."""

    strategy: str
    granularity: str | None
    allocation: str | None
    target: float | None
    seed: int


def default_out(task: str, model: str, scale: str) -> Path:
    """results/<task>/<model>.json (full scale), results/<task>/<model>-cpu.json, or
    runs/sweep-smoke/<task>/<model>.json for smoke runs."""
    if scale == "smoke":
        return Path("runs") / "sweep-smoke" / task / f"{model}.json"
    return (
        Path("results") / task / (f"{model}.json" if scale == "full" else f"{model}-{scale}.json")
    )


def plan(rec: Recipe, seeds: tuple[int, ...], scale: str = "full") -> list[Eval | Finetune]:
    """The jobs in priority order: what the issue's claims need first, then the rest.

    The smoke scale runs one of each kind of job (the pipeline, not the comparisons).
    """
    s, o, c = rec.strategy, rec.other, rec.coarse
    f, low = rec.frontier, rec.lower
    first, rest = seeds[0], seeds[1:]
    if scale == "smoke":
        return [
            Eval(s, "element", "global"),
            Eval(s, "element", "uniform"),
            Eval("random", "element", "uniform"),
            Eval(o, c, "uniform"),
            Finetune(s, "element", "global", f, first),
            Finetune("dense", None, None, None, first),
        ]
    jobs: list[Eval | Finetune] = [
        Eval(s, "element", "global"),
        Finetune(s, "element", "global", f, first),
        Finetune("dense", None, None, None, first),
        *(Finetune(s, "element", "global", f, seed) for seed in rest),
        Eval(o, "element", "global"),
        Finetune(o, "element", "global", f, first),
        Eval("random", "element", "uniform"),
        Finetune("random", "element", "uniform", f, first),
        Eval(s, "element", "uniform"),
        Eval(s, c, "uniform"),
        Eval(o, "element", "uniform"),
        Eval(s, c, "global"),
        Eval(o, c, "uniform"),
        Eval(o, c, "global"),
        Finetune(s, "element", "global", low, first),
        Finetune(s, c, "global", rec.targets[0], first),
        Finetune(s, "element", "uniform", f, first),
        *(Finetune(o, "element", "global", f, seed) for seed in rest),
        *(Finetune("random", "element", "uniform", f, seed) for seed in rest),
        *(Finetune("dense", None, None, None, seed) for seed in rest),
        *(Finetune(s, "element", "global", low, seed) for seed in rest),
    ]
    return jobs


def _commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("SELACT_COMMIT"):
        return os.environ["SELACT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here.parents[1], check=False
        ).returncode
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class _Rows:
    """The sweep's rows, rewritten atomically to ``path`` after every addition."""

    def __init__(self, path: Path, base: dict[str, Any], keep: list[dict[str, Any]]):
        self.path, self.base, self.rows = path, base, keep

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**self.base, **row, "date": _now()}
        self.rows.append(row)
        atomic_write_text(self.path, json.dumps(self.rows, indent=1, default=float) + "\n")
        log.info(
            "row: %s %s %s target %s ft %s seed %s: exec %.3f top1 %.4f val %.4f",
            row["strategy"],
            row.get("granularity"),
            row.get("allocation"),
            row.get("target_mac_fraction"),
            row.get("finetune_epochs"),
            row.get("seed"),
            row["executed_mac_fraction"],
            row["top1"],
            row["val_top1"],
        )
        return row


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Clock:
    def __init__(self, budget: float | None) -> None:
        self.start = time.monotonic()
        self.budget = budget

    def left(self) -> float:
        if self.budget is None:
            return float("inf")
        return self.budget - (time.monotonic() - self.start)

    def deadline(self, margin: float) -> float | None:
        """The :func:`time.monotonic` time ``margin`` seconds before the budget ends."""
        return None if self.budget is None else self.start + self.budget - margin


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _calibration(task: Task, rec: Recipe) -> list[torch.Tensor]:
    """The first ``calib_images`` validation images, as model inputs."""
    loader = task.loader("val", batch_size=rec.calib_batch, train=False)
    batches, count = [], 0
    for batch in loader:
        if count >= rec.calib_images:
            break
        batches.append(task.inputs(batch))
        count += rec.calib_batch
    return batches


def _convert(
    dense: nn.Module,
    strategy: str,
    granularity: str,
    densities: dict[str, float] | None = None,
    density: float = 1.0,
) -> nn.Module:
    """A converted copy of ``dense`` (reference backend, no finite check) at ``density``, or
    at per-layer ``densities``."""
    model = copy.deepcopy(dense)
    config = selact.SelectiveConfig(
        strategy=strategy,
        density=density,
        granularity=granularity,
        backend="reference",
        check_finite=False,
    )
    selact.sparsify(model, config)
    if densities is not None:
        apply_densities(model, densities)
    return model


def _measure(task: Task, model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    """Val and test metrics of ``model`` and its MAC counts on each."""
    from selact.train import evaluate

    out: dict[str, Any] = {}
    for split, prefix in (("val", "val_"), ("test", "")):
        if split not in task.splits:
            continue
        selact.reset_stats(model)
        metrics = evaluate(task, model, split, config)
        total = selact.stats(model).total
        for key, value in metrics.items():
            out[f"{prefix}{key}"] = value
        out[f"{prefix}executed_mac_fraction"] = total.executed_fraction
        out[f"{prefix}zero_skip_mac_fraction"] = total.zero_skip_fraction
        out[f"{prefix}executed_over_zero_skip"] = total.executed_over_zero_skip
        selact.reset_stats(model)
    return out


def _counted(model: nn.Module) -> nn.Module:
    """``model`` if it is converted, else a copy with every layer counted as dense."""
    if any(isinstance(m, selact.SelectiveModule) for m in model.modules()):
        return model
    return selact.sparsify(copy.deepcopy(model), filter_fn=lambda module, name: False)


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    except Exception:
        log.exception("sweep: %s failed; going on with the next job", what)
    else:
        log.info("sweep: %s done in %.1f s", what, time.monotonic() - start)


def run_sweep(
    config: SweepConfig, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run the sweep (see the module docstring); return the rows written."""
    clock = _Clock(config.time_budget)
    rec = recipe(config.model, config.scale)
    device = _device(config.device)
    out = Path(config.out) if config.out else default_out(config.task, config.model, config.scale)
    if config.scale == "smoke" and "results" in out.resolve().parts:
        raise ValueError(f"{out}: smoke runs never write to results/")
    run_dir = Path(config.run_dir or f"runs/sweep/{config.task}-{config.model}-{config.scale}")
    options = TaskOptions(
        data=config.data,
        device=device,
        train_limit=rec.train_limit,
        eval_limit=rec.eval_limit,
        channels_last=device.startswith("cuda"),
    )
    task = create_task(config.task, options, **rec.task_args)
    base = {
        "model": config.model,
        "task": config.task,
        "scale": config.scale,
        "hardware": hardware(device),
        "command": config.command,
        "commit": _commit(config.commit),
    }
    rows = _Rows(out, base, [])
    add = rows.add if on_row is None else (lambda r: on_row(rows.add(r)))

    # 1. The dense model.
    dense_config = rec.dense
    if config.time_budget is not None:
        dense_config = dense_config.replace(time_limit=max(1.0, config.dense_share * clock.left()))
    if config.dense_checkpoint:
        dense = create_model(config.model, **task.model_kwargs())
        dense, info = load_model(dense, config.dense_checkpoint)
        dense.to(device)
        checkpoint = Path(config.dense_checkpoint)
    else:
        torch.manual_seed(dense_config.seed)
        dense = create_model(config.model, **task.model_kwargs())
        result = fit(
            task,
            dense,
            dense_config,
            run_dir=run_dir / "dense",
            resume=config.resume,
            progress=config.progress,
            info={"model": config.model, "command": config.command},
        )
        dense, info, checkpoint = result.model, result.info, result.checkpoint
    dense.eval()
    dense_sha = file_sha256(checkpoint) if checkpoint else None
    eval_config = rec.dense.replace(eval_batch_size=1000)
    common = {"dense_checkpoint": str(checkpoint), "dense_epochs_done": info.get("epochs_done")}
    add(
        {
            "strategy": "dense",
            "granularity": None,
            "allocation": None,
            "target_mac_fraction": 1.0,
            "target_density": 1.0,
            "finetune_epochs": 0,
            "seed": dense_config.seed,
            "checkpoint_sha256": dense_sha,
            "dense_train_seconds": info.get("train_seconds"),
            "dense_config": info.get("config"),
            "dense_history": info.get("history"),
            **common,
            **_measure(task, _counted(dense), eval_config),
        }
    )
    zero_skip = selact.sparsify(
        copy.deepcopy(dense), strategy="zero_skip", check_finite=False, backend="reference"
    )
    add(
        {
            "strategy": "zero_skip",
            "granularity": None,
            "allocation": None,
            "target_mac_fraction": None,
            "target_density": None,
            "finetune_epochs": 0,
            "seed": dense_config.seed,
            "checkpoint_sha256": dense_sha,
            **common,
            **_measure(task, zero_skip, eval_config),
        }
    )
    del zero_skip

    # 2. Jobs, in priority order, while time is left.
    calib = _calibration(task, rec)
    targets = rec.all_targets()
    searches: dict[tuple[str, str, str], dict[float, BudgetResult]] = {}

    def search(strategy: str, granularity: str, allocation: str) -> dict[float, BudgetResult]:
        key = (strategy, granularity, allocation)
        if key not in searches:
            model = _convert(dense, strategy, granularity)
            start = time.monotonic()
            with autocast(eval_config, torch.device(device)):
                if allocation == "global":
                    found = budget_search(
                        model,
                        calib,
                        targets,
                        sensitivity=task.sensitivity,
                        mac_step=config.mac_step,
                        max_steps=rec.search_steps,
                        deadline=clock.deadline(10.0),
                    )
                else:
                    found = uniform_search(
                        model,
                        calib,
                        targets,
                        sensitivity=task.sensitivity,
                        deadline=clock.deadline(10.0),
                    )
            log.info("search %s: %.1f s", key, time.monotonic() - start)
            searches[key] = {r.target: r for r in found}
        return searches[key]

    def budget_fields(result: BudgetResult) -> dict[str, Any]:
        return {
            "target_mac_fraction": result.target,
            "target_density": result.mean_density(),
            "densities": result.densities,
            "calib_executed_mac_fraction": result.executed_fraction,
            "calib_sensitivity": result.sensitivity,
            "calib_images": rec.calib_images,
        }

    ft_seconds_per_epoch: float | None = None
    dense_epoch = _epoch_seconds(info)
    finetunes = 0
    for job in plan(rec, config.seeds, config.scale):
        if isinstance(job, Finetune):
            if config.max_finetunes is not None and finetunes >= config.max_finetunes:
                continue
            epochs = rec.finetune.epochs
            per_epoch = ft_seconds_per_epoch or 2.5 * dense_epoch
            need = epochs * per_epoch + 10.0
            if need > clock.left():
                log.info("sweep: skipping %s (needs ~%.0f s, %.0f s left)", job, need, clock.left())
                continue
            finetunes += 1
            with _logged(f"fine-tuning {job}"):
                row, seconds = _finetune(
                    job, task, dense, rec, config, run_dir, search, budget_fields, clock
                )
                add({**base_ft(common, dense_sha), **row})
                if job.strategy != "dense" and seconds:
                    ft_seconds_per_epoch = seconds
        else:
            if clock.left() < 20.0:
                log.info("sweep: skipping %s (%.0f s left)", job, clock.left())
                continue
            with _logged(f"evaluation {job}"):
                results = search(job.strategy, job.granularity, job.allocation)
                model = _convert(dense, job.strategy, job.granularity)
                for target in targets:
                    result = results.get(target)
                    if result is None or result.executed_fraction > target + 1e-6:
                        continue  # not reached before the deadline
                    if clock.left() < 5.0:
                        break
                    apply_densities(model, result.densities)
                    torch.manual_seed(0)  # the random strategy's masks
                    add(
                        {
                            "strategy": job.strategy,
                            "granularity": job.granularity,
                            "allocation": job.allocation,
                            **budget_fields(result),
                            "finetune_epochs": 0,
                            "seed": dense_config.seed,
                            "checkpoint_sha256": dense_sha,
                            **common,
                            **_measure(task, model, eval_config),
                        }
                    )
    return rows.rows


def base_ft(common: dict[str, Any], dense_sha: str | None) -> dict[str, Any]:
    return {**common, "dense_checkpoint_sha256": dense_sha}


def _epoch_seconds(info: dict[str, Any]) -> float:
    history = info.get("history") or []
    seconds = [h["seconds"] for h in history if h.get("seconds")]
    return sum(seconds) / len(seconds) if seconds else 10.0


def _finetune(job, task, dense, rec, config, run_dir, search, budget_fields, clock):
    """One fine-tuning run and its row; returns (row, seconds per epoch)."""
    ft_config = rec.finetune.replace(seed=job.seed)
    if config.time_budget is not None:  # a safety net: the plan only starts runs that fit
        ft_config = ft_config.replace(time_limit=max(1.0, clock.left() - 10.0))
    fields: dict[str, Any]
    if job.strategy == "dense":
        model = copy.deepcopy(dense)
        name = f"ft-dense-s{job.seed}"
        fields = {"target_mac_fraction": 1.0, "target_density": 1.0}
    else:
        result = search(job.strategy, job.granularity, job.allocation).get(job.target)
        if result is None or result.executed_fraction > job.target + 1e-6:
            raise RuntimeError(f"no allocation meets the target {job.target:.4f}")
        model = _convert(dense, job.strategy, job.granularity, result.densities)
        name = f"ft-{job.strategy}-{job.granularity}-{job.allocation}-{job.target:.3f}-s{job.seed}"
        fields = budget_fields(result)
    torch.manual_seed(job.seed)
    fitted = fit(
        task,
        model,
        ft_config,
        run_dir=run_dir / name,
        teacher=dense,
        resume=config.resume,
        progress=config.progress,
        info={"model": config.model, "command": config.command, "job": dataclasses.asdict(job)},
        final_splits=(),
    )
    measured = _measure(task, _counted(fitted.model), rec.dense.replace(eval_batch_size=1000))
    epochs_done = fitted.info.get("epochs_done", ft_config.epochs)
    row = {
        "strategy": job.strategy,
        "granularity": job.granularity,
        "allocation": job.allocation,
        **fields,
        "finetune_epochs": ft_config.epochs,
        "epochs_done": epochs_done,
        "seed": job.seed,
        "checkpoint_sha256": fitted.info.get("sha256"),
        "train_seconds": fitted.train_seconds,
        "finetune_config": ft_config.to_dict(),
        **measured,
    }
    return row, fitted.train_seconds / max(1e-9, epochs_done)
