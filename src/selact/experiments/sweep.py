"""The accuracy-against-calculations sweep of one model on one task (``selact sweep``).

Steps, in the order they run (each result row is written as soon as it exists, so a run stopped
at any point keeps what it finished):

1. **dense**: train the model (or load ``dense_checkpoint``); rows ``dense`` (every MAC) and
   ``zero_skip`` (only nonzero inputs: ReLU's free sparsity).
2. **jobs**, in priority order, while the time budget allows (less those that the rows of an
   earlier sweep of the same dense checkpoint hold: ``done_rows``, ``--done-rows``):
   - *evaluation without fine-tuning*: for a (strategy, granularity, allocation), find the
     per-layer densities meeting each executed/dense MAC target on validation images
     (``uniform``: one density by bisection; ``global``: :func:`selact.amu.budget_search`), then
     evaluate each on val and test;
   - *fine-tuning*: mask-aware fine-tuning of the dense model converted at one target, one seed
     (distillation from the dense model, density schedule), then evaluation; and the *control*:
     the dense model fine-tuned with the same recipe and epochs.

**Parallel jobs** (each job alone leaves a GPU mostly idle, waiting on Python): ``shard=(I, K)``
(``--shard I/K``) runs only the jobs ``j`` of :func:`plan` with ``j % K == I`` (round robin, so
every shard starts with high-priority work); a shard with ``I > 0`` loads ``dense_checkpoint`` and
writes no ``dense``/``zero_skip`` rows. ``workers=N`` (``--workers N``) trains or loads the dense
model and writes its rows, then starts N-1 processes ``python -m selact sweep ... --shard i/N``
(out ``<out>.shard{i}.json``, run dir ``<run_dir>/shard{i}``, the budget left, logs on stderr
prefixed ``[shard i]`` and in ``<run_dir>/shard{i}/sweep.log``), runs shard 0/N itself, waits for
them (until its own budget ends, then stops them; they are given CHILD_MARGIN seconds less),
shares its budget searches with them (``search_dir``, :mod:`selact.experiments.search_store`:
each search runs once, in the first process that needs it),
appends their rows to ``out`` and deletes the shard files. A failed shard is logged and its rows so far are kept; if the parent itself is
killed, the shard files stay on disk (:func:`merge_shard_files` adds them to ``out``). Job rows of a sharded
run carry ``shard`` ("I/K").

Settings are chosen on ``val`` only (the budget searches measure validation images); ``test``
only reports. Seeds are fine-tuning seeds (data order, augmentation); one dense model per
architecture. Accuracy is computed with the reference MGEMM backend, which defines results.

Rows (a list, JSON): model, task, strategy (dense, zero_skip, sapi, sapw, random), granularity,
allocation (uniform, global), target_mac_fraction (the budget asked), target_density (the uniform
density, or the mean of the per-layer densities), densities (per layer), executed_mac_fraction and
zero_skip_mac_fraction (both of dense, on test), executed_over_zero_skip, top1 and top1_flip (test,
fractions), val_top1, val_top1_flip, val_executed_mac_fraction, calib_executed_mac_fraction (on
the search's images), finetune_epochs, seed, scale, task_args (the task's settings: the recipe's
with ``--task-arg`` over them; in fine-tuning rows the fine-tuning's, see :func:`sweep_recipe`),
hardware, command, checkpoint_sha256, commit, date; fine-tuning rows add train_seconds and
epochs_done.
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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selact
from selact._files import atomic_write_text
from selact._provenance import commit
from selact.amu.budget import BudgetResult, apply_densities, budget_search, uniform_search
from selact.experiments.recipes import Recipe, recipe
from selact.experiments.search_store import SearchStore
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

__all__ = [
    "Eval",
    "Finetune",
    "SweepConfig",
    "calibration_batches",
    "converted_copy",
    "default_out",
    "merge_shard_files",
    "parse_shard",
    "plan",
    "run_sweep",
    "shard_jobs",
    "sweep_recipe",
]

log = logging.getLogger(__name__)

#: Seconds by which the children of ``workers > 1`` end before the parent's budget.
CHILD_MARGIN = 30.0


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
    workers: int = 1  # processes running jobs at once (see the module docstring)
    shard: tuple[int, int] | None = None  # (I, K): only the jobs j of the plan with j % K == I
    search_dir: str | None = None  # budget searches shared by the shards; None: <run_dir>/searches
    done_rows: str | None = None  # rows of an earlier sweep: the jobs they hold are not run again
    strategy: str | None = None  # the AMU strategy fine-tuned first; None: the recipe's
    finetune_epochs: int | None = None  # None: the recipe's
    frontier: float | None = None  # the MAC target fine-tuned with every seed; None: the recipe's
    task_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # over the recipe's
    # over the recipe's fine-tuning settings and task_args, for fine-tuning only
    finetune_task_args: dict[str, Any] = dataclasses.field(default_factory=dict)

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
    return list(dict.fromkeys(jobs))  # a frontier equal to the lower target: each job once


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/K"`` (``--shard``) as ``(I, K)``; ValueError unless ``0 <= I < K``."""
    index, sep, count = text.strip().partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None:
        raise ValueError(f"--shard {text!r}: expected I/K (shard I of K, 0-based), e.g. 1/4")
    return _check_shard(shard)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: needs 0 <= I < K (shard I of K, 0-based)")
    return index, count


def shard_jobs(jobs: list[Eval | Finetune], shard: tuple[int, int] | None) -> list[Eval | Finetune]:
    """The jobs ``jobs[j]`` with ``j % K == I`` for ``shard=(I, K)`` (all of them for None), in
    order: the shards 0..K-1 partition ``jobs``, each starting with high-priority work."""
    if shard is None:
        return list(jobs)
    index, count = _check_shard(shard)
    return [job for j, job in enumerate(jobs) if j % count == index]


def _validate(config: SweepConfig) -> tuple[int, int] | None:
    """Check ``workers`` and ``shard``; return the shard this process runs (None: every job)."""
    if config.workers < 1:
        raise ValueError(f"workers={config.workers}: needs at least 1")
    if config.shard is not None:
        if config.workers > 1:
            raise ValueError("workers > 1 and shard cannot be combined")
        index, count = _check_shard(tuple(config.shard))
        if index > 0 and not config.dense_checkpoint:
            raise ValueError(
                f"shard {index}/{count} needs dense_checkpoint (--dense-checkpoint): only shard 0 "
                "trains the dense model"
            )
        return index, count
    return (0, config.workers) if config.workers > 1 else None


def sweep_recipe(config: SweepConfig) -> Recipe:
    """The model's recipe with the sweep's overrides: the strategy fine-tuned first (the other
    AMU strategy becomes the second), the fine-tuning epochs, the target fine-tuned with every
    seed and task settings: ``task_args`` over the recipe's for dense training and fine-tuning
    alike (over the recipe's own fine-tuning settings too), ``finetune_task_args`` over those for
    fine-tuning only."""
    rec = recipe(config.model, config.scale)
    rec = dataclasses.replace(
        rec,
        task_args={**rec.task_args, **config.task_args},
        finetune_task_args={
            **rec.finetune_task_args,
            **config.task_args,
            **config.finetune_task_args,
        },
    )
    if config.strategy is not None:
        if config.strategy not in ("sapi", "sapw"):
            raise ValueError(f"strategy must be 'sapi' or 'sapw', got {config.strategy!r}")
        other = "sapw" if config.strategy == "sapi" else "sapi"
        rec = dataclasses.replace(rec, strategy=config.strategy, other=other)
    if config.finetune_epochs is not None:
        if config.finetune_epochs < 1:
            raise ValueError(f"finetune_epochs must be at least 1, got {config.finetune_epochs}")
        rec = dataclasses.replace(rec, finetune=rec.finetune.replace(epochs=config.finetune_epochs))
    if config.frontier is not None:
        if not 0.0 < config.frontier <= 1.0:
            raise ValueError(f"frontier must be in (0, 1], got {config.frontier}")
        rec = dataclasses.replace(rec, frontier=config.frontier)
    return rec


def done_jobs(
    rows: list[dict[str, Any]],
    dense_sha: str | None,
    finetune_epochs: int,
    task_args: dict[str, Any] | None = None,
) -> set[Eval | Finetune | str]:
    """The jobs (and ``"dense"`` for the dense rows) that ``rows`` already hold for the dense
    checkpoint of hash ``dense_sha``; fine-tuning rows count only at ``finetune_epochs`` and, where
    a row records its task settings (``task_args``, rows since 2026-11-27), only with the same."""
    done: set[Eval | Finetune | str] = set()
    for row in rows:
        if row.get("dense_checkpoint_sha256", row.get("checkpoint_sha256")) != dense_sha:
            continue
        strategy, epochs = row.get("strategy"), row.get("finetune_epochs", 0)
        key = (strategy, row.get("granularity"), row.get("allocation"))
        same_task = task_args is None or row.get("task_args", task_args) == task_args
        if strategy in ("dense", "zero_skip") and not epochs:
            done.add("dense")
        elif not epochs:
            done.add(Eval(*key))
        elif epochs == finetune_epochs and same_task:
            target = None if strategy == "dense" else row.get("target_mac_fraction")
            done.add(_keyed(Finetune(*key, target, row.get("seed"))))
    return done


def _keyed(job: Eval | Finetune) -> Eval | Finetune:
    """``job`` with its target rounded, so that a target read back from JSON (1/3) finds it."""
    if isinstance(job, Finetune) and job.target is not None:
        return dataclasses.replace(job, target=round(job.target, 9))
    return job


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A sweep's rows file; a clear error if it is missing or not a list of rows."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no such rows file") from err
    except ValueError as err:
        raise ValueError(f"{path}: not a JSON rows file ({err})") from err
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: expected a list of rows")
    return rows


def _jobs(
    rec: Recipe,
    config: SweepConfig,
    shard: tuple[int, int] | None,
    done: set[Eval | Finetune | str] = frozenset(),
) -> list[Eval | Finetune]:
    """This process's jobs: the plan less the ``done`` ones. Split into shards,
    ``max_finetunes`` keeps the first fine-tuning jobs of the whole plan (in one process it
    counts the runs started)."""
    jobs = [job for job in plan(rec, config.seeds, config.scale) if _keyed(job) not in done]
    if shard is not None and shard[1] > 1 and config.max_finetunes is not None:
        finetunes = [i for i, job in enumerate(jobs) if isinstance(job, Finetune)]
        drop = set(finetunes[config.max_finetunes :])
        jobs = [job for i, job in enumerate(jobs) if i not in drop]
    return shard_jobs(jobs, shard)


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

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Append finished rows (another shard's) as they are, in one write."""
        self.rows.extend(rows)
        atomic_write_text(self.path, json.dumps(self.rows, indent=1, default=float) + "\n")


@dataclasses.dataclass
class _Child:
    """One shard running in a process of its own."""

    shard: str
    out: Path
    log: Path
    process: subprocess.Popen[str]
    pump: threading.Thread


def _child_args(
    config: SweepConfig,
    commit: str,
    checkpoint: Path,
    out: Path,
    run_dir: Path,
    searches: Path,
    shard: str,
    budget: float | None,
) -> list[str]:
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    return [
        sys.executable, "-m", "selact", *(["-v"] if verbose else []), "sweep",
        "--task", config.task, "--model", config.model, "--scale", config.scale,
        *(["--data", str(config.data)] if config.data is not None else []),
        "--device", config.device,
        "--seeds", ",".join(str(seed) for seed in config.seeds),
        "--mac-step", repr(config.mac_step),
        *(["--max-finetunes", str(config.max_finetunes)] if config.max_finetunes is not None
          else []),
        "--commit", commit, "--command", config.command,
        "--dense-checkpoint", str(checkpoint), "--shard", shard,
        *(["--time-budget", f"{budget:.1f}"] if budget is not None else []),
        "--out", str(out), "--run-dir", str(run_dir), "--search-dir", str(searches),
        *(["--done-rows", str(config.done_rows)] if config.done_rows else []),
        *(["--strategy", config.strategy] if config.strategy else []),
        *(["--finetune-epochs", str(config.finetune_epochs)] if config.finetune_epochs else []),
        *(["--frontier", repr(config.frontier)] if config.frontier is not None else []),
        *(a for k, v in config.task_args.items() for a in ("--task-arg", f"{k}={json.dumps(v)}")),
        *(a for k, v in config.finetune_task_args.items()
          for a in ("--finetune-task-arg", f"{k}={json.dumps(v)}")),
        "--resume" if config.resume else "--no-resume", "--no-progress",
    ]  # fmt: skip


def _pump(stream: Any, prefix: str, log_path: Path, sink: Any) -> None:
    """Copy a child's output to its log file and, prefixed, to ``sink`` (our stderr)."""
    with open(log_path, "a", encoding="utf-8") as file:
        for line in stream:
            file.write(line)
            file.flush()
            try:
                sink.write(prefix + line)
                sink.flush()
            except (OSError, ValueError):  # our stderr went away: the log file still has it
                pass


def _launch(
    config: SweepConfig,
    commit: str,
    checkpoint: Path,
    out: Path,
    run_dir: Path,
    searches: Path,
    left: float | None,
    threads: int | None = None,
) -> list[_Child]:
    """Start shards 1..workers-1 as ``python -m selact sweep`` processes of their own."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    # The same code as ours, installed or not (PYTHONPATH=src setups, pytest's path).
    src = str(Path(selact.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    children = []
    for i in range(1, config.workers):
        shard = f"{i}/{config.workers}"
        child_out = out.with_suffix(f".shard{i}.json")
        child_out.unlink(missing_ok=True)  # never merge a stale file from an earlier run
        child_dir = run_dir / f"shard{i}"
        child_dir.mkdir(parents=True, exist_ok=True)
        args = _child_args(config, commit, checkpoint, child_out, child_dir, searches, shard, left)
        log.info("sweep: starting shard %s: %s", shard, " ".join(args))
        process = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        pump = threading.Thread(
            target=_pump,
            args=(process.stdout, f"[shard {i}] ", child_dir / "sweep.log", sys.stderr),
            daemon=True,
        )
        pump.start()
        children.append(_Child(shard, child_out, child_dir / "sweep.log", process, pump))
    return children


def _stop(child: _Child) -> None:
    if child.process.poll() is None:
        child.process.terminate()
        try:
            child.process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    child.pump.join(timeout=10.0)


def _join(children: list[_Child], deadline: float | None) -> None:
    """Wait for every child until ``deadline`` (:func:`time.monotonic`), then stop the rest."""
    for child in children:
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            child.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error(
                "sweep: shard %s still running after its time budget; stopping it", child.shard
            )
        _stop(child)


def _merge(rows: _Rows, children: list[_Child]) -> list[dict[str, Any]]:
    """Append the children's rows to ``rows`` (one write), delete their files; the rows added."""
    for child in children:
        code = child.process.returncode
        if code != 0:
            log.error(
                "sweep: shard %s failed (exit %s; log %s); keeping the rows it wrote to %s",
                child.shard,
                code,
                child.log,
                child.out,
            )
    return _append_shards(rows, [child.out for child in children])


def _append_shards(rows: _Rows, paths: list[Path]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    done: list[Path] = []
    for path in paths:
        if not path.is_file():
            log.info("sweep: %s: no rows", path)
            continue
        try:
            theirs = read_rows(path)
        except (OSError, ValueError) as err:
            log.error("sweep: cannot read %s (%s); left as it is", path, err)
            continue
        merged.extend(theirs)
        done.append(path)
    if merged:
        rows.extend(merged)
    for path in done:
        path.unlink(missing_ok=True)
    log.info("sweep: merged %d rows of %d shard files into %s", len(merged), len(done), rows.path)
    return merged


def merge_shard_files(out: str | os.PathLike[str]) -> int:
    """Add the rows of ``<out>.shard*.json`` (left by a sweep stopped before it merged them) to
    ``out`` and delete those files; returns the number of rows added."""
    out = Path(out)
    paths = sorted(out.parent.glob(f"{out.stem}.shard*.json"))
    keep = read_rows(out) if out.is_file() else []
    return len(_append_shards(_Rows(out, {}, keep), paths))


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


def calibration_batches(task: Task, rec: Recipe) -> list[torch.Tensor]:
    """The first ``calib_images`` validation images, as model inputs."""
    loader = task.loader("val", batch_size=rec.calib_batch, train=False)
    batches, count = [], 0
    for batch in loader:
        if count >= rec.calib_images:
            break
        batches.append(task.inputs(batch))
        count += rec.calib_batch
    return batches


def converted_copy(
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
    """Run the sweep (see the module docstring); return the rows written (with ``workers > 1``,
    every shard's)."""
    clock = _Clock(config.time_budget)
    shard = _validate(config)
    rec = sweep_recipe(config)
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
    # fine-tuning's own task where its settings differ (augmentation: data and loss alike)
    ft_settings = rec.finetune_settings()
    ft_task = (
        task if ft_settings == rec.task_args else create_task(config.task, options, **ft_settings)
    )
    base = {
        "model": config.model,
        "task": config.task,
        "scale": config.scale,
        "hardware": hardware(device),
        "command": config.command,
        "commit": config.commit or commit(),
        "task_args": rec.task_args,
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
            evaluations_after=2,  # the dense and zero_skip rows (_dense_rows)
        )
        dense, info, checkpoint = result.model, result.info, result.checkpoint
    dense.eval()
    dense_sha = file_sha256(checkpoint) if checkpoint else None
    store = SearchStore(
        config.search_dir or run_dir / "searches",
        {
            "task": config.task,
            "model": config.model,
            "dense_sha256": dense_sha,
            "targets": rec.all_targets(),
            "mac_step": config.mac_step,
            "search_steps": rec.search_steps,
            "search_refresh": rec.search_refresh,
            "calib_images": rec.calib_images,
            "calib_batch": rec.calib_batch,
        },
    )
    if config.shard is None and not config.resume:
        store.clear()  # starting over: no search of an earlier run
    done = set()
    if config.done_rows:
        done = done_jobs(
            read_rows(config.done_rows), dense_sha, rec.finetune.epochs, rec.finetune_settings()
        )
        log.info("sweep: %d jobs already in %s", len(done), config.done_rows)
    eval_config = rec.dense.replace(eval_batch_size=1000)
    common = {
        "dense_checkpoint": str(checkpoint),
        "dense_epochs_done": info.get("epochs_done"),
        "dense_best_epoch": info.get("best_epoch"),  # keep_best: the weights kept, if not the last
    }
    if (shard is None or shard[0] == 0) and "dense" not in done:
        _dense_rows(task, dense, dense_config, info, dense_sha, common, eval_config, add)
    children: list[_Child] = []
    deadline: float | None = None
    threads: int | None = None  # CPU threads per process (None: as they are)
    if config.workers > 1:
        if checkpoint is None:  # fit() saves into run_dir on the main process
            raise RuntimeError("workers > 1: the dense model has no checkpoint to share")
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, torch.get_num_threads() // config.workers)  # the cores, shared
        left = None if config.time_budget is None else max(1.0, clock.left())
        # Children end CHILD_MARGIN early: their last evaluations run long on a shared GPU, and
        # the parent still has to merge their rows inside its own budget.
        budget = None if left is None else max(1.0, left - CHILD_MARGIN)
        children = _launch(
            config, base["commit"], checkpoint, out, run_dir, store.folder, budget, threads
        )
        deadline = None if left is None else time.monotonic() + left
    if shard is not None:
        rows.base["shard"] = f"{shard[0]}/{shard[1]}"
    own_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        _run_jobs(
            config, rec, task, ft_task, dense, dense_config, info, dense_sha, common, eval_config,
            run_dir, store, clock, add, shard, done,
        )  # fmt: skip
    except BaseException:
        for child in children:
            _stop(child)
        raise
    finally:
        torch.set_num_threads(own_threads)
    if children:
        _join(children, deadline)
        for row in _merge(rows, children):
            if on_row is not None:
                on_row(row)
    return rows.rows


def _dense_rows(task, dense, dense_config, info, dense_sha, common, eval_config, add) -> None:
    """The rows ``dense`` (every MAC counted) and ``zero_skip`` of the dense model."""
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


def _run_jobs(
    config, rec, task, ft_task, dense, dense_config, info, dense_sha, common, eval_config, run_dir,
    store, clock, add, shard, done,
) -> None:  # fmt: skip
    """2. This process's jobs, in priority order, while time is left; each budget search runs
    once across the sweep's processes (``store``). ``ft_task``: the task with fine-tuning's
    settings (``task`` itself where they are the same)."""
    device = _device(config.device)
    calib = calibration_batches(task, rec)
    targets = rec.all_targets()
    searches: dict[tuple[str, str, str], dict[float, BudgetResult]] = {}

    def run_search(strategy: str, granularity: str, allocation: str) -> list[BudgetResult]:
        model = converted_copy(dense, strategy, granularity)
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
                    refresh=rec.search_refresh,
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
        log.info("search %s: %.1f s", (strategy, granularity, allocation), time.monotonic() - start)
        return found

    def complete(found: list[BudgetResult]) -> bool:
        reached = {r.target for r in found if r.executed_fraction <= r.target + 1e-6}
        return all(t in reached for t in targets)

    def search(strategy: str, granularity: str, allocation: str) -> dict[float, BudgetResult]:
        key = (strategy, granularity, allocation)
        if key not in searches:
            found = store.get(
                key,
                lambda: run_search(*key),
                complete,
                deadline=clock.deadline(10.0),
            )
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
    dense_epoch: list[float] = []  # seconds per dense epoch here, found at the first need
    finetunes = 0
    for job in _jobs(rec, config, shard, done):
        if isinstance(job, Finetune):
            if config.max_finetunes is not None and finetunes >= config.max_finetunes:
                continue
            epochs = rec.finetune.epochs
            if not ft_seconds_per_epoch and not dense_epoch:
                shared = config.shard is not None and config.shard[1] > 1
                dense_epoch.append(
                    _dense_epoch_seconds(info, ft_task, dense, rec.finetune, device, shared)
                )
            per_epoch = ft_seconds_per_epoch or 2.5 * dense_epoch[0]
            need = epochs * per_epoch + 10.0
            if need > clock.left():
                log.info("sweep: skipping %s (needs ~%.0f s, %.0f s left)", job, need, clock.left())
                continue
            finetunes += 1
            with _logged(f"fine-tuning {job}"):
                row, seconds = _finetune(
                    job, task, ft_task, dense, rec, config, run_dir, search, budget_fields, clock
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
                model = converted_copy(dense, job.strategy, job.granularity)
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


def base_ft(common: dict[str, Any], dense_sha: str | None) -> dict[str, Any]:
    return {**common, "dense_checkpoint_sha256": dense_sha}


def _dense_epoch_seconds(
    info: dict[str, Any],
    task: Task,
    dense: nn.Module,
    config: TrainConfig,
    device: str,
    shared: bool = False,
) -> float:
    """Seconds per epoch of dense training here: the dense run's own epochs if it ran on this
    hardware and this sweep runs alone, else timed on two training steps now (a checkpoint trained
    on a GPU would otherwise have a CPU sweep start fine-tuning runs it has no time for, and a
    checkpoint trained alone would have ``shared`` sweep processes, which split the device, do
    the same: a ViT fine-tuning run took 140 s with 8 processes on an H100 and 27 s alone)."""
    history = info.get("history") or []
    seconds = [h["seconds"] for h in history if h.get("seconds")]
    if seconds and info.get("hardware") == hardware(device) and not shared:
        return sum(seconds) / len(seconds)
    model = copy.deepcopy(dense).train()
    loader = task.loader("train", batch_size=config.batch_size, train=True)
    batches = iter(loader)
    times = []
    for _ in range(3):  # the first step warms up
        batch = next(batches)
        start = time.perf_counter()
        with autocast(config, torch.device(device)):
            loss = task.loss(model, batch)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    estimate = min(times[1:]) * len(loader)
    log.info("sweep: a dense epoch here takes about %.1f s (timed on 2 steps)", estimate)
    return estimate


def _finetune(job, task, ft_task, dense, rec, config, run_dir, search, budget_fields, clock):
    """One fine-tuning run on ``ft_task`` and its row, measured on ``task`` as every row is;
    returns (row, seconds per epoch)."""
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
        model = converted_copy(dense, job.strategy, job.granularity, result.densities)
        name = f"ft-{job.strategy}-{job.granularity}-{job.allocation}-{job.target:.3f}-s{job.seed}"
        fields = budget_fields(result)
    torch.manual_seed(job.seed)
    fitted = fit(
        ft_task,
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
        "task_args": rec.finetune_settings(),
        **measured,
    }
    return row, fitted.train_seconds / max(1e-9, epochs_done)
