"""The VOC detection sweep: train ``det`` densely, then trade mAP@0.5 for multiplications.

``selact sweep --task voc --model det --scale cpu --data ../shared/data`` (or ``--scale full`` on
a GPU) runs, each stage resumable from ``runs/voc/det-<scale>/``:

1. dense training of ``det`` on VOC ``train`` (:func:`selact.train.fit`, checkpoints every
   epoch), evaluated on ``val``;
2. rows, each evaluated on ``val`` with MACs counted by :func:`selact.stats`:
   - ``dense`` (nothing converted: executed = dense MACs) and ``zero_skip`` on every layer;
   - ``sapi`` and ``sapw`` on each layer group (``conv``, ``attn_linear``, ``all``; see
     :func:`selact.models.det.layer_filter`) at each target density, without fine-tuning;
   - ``random`` masks on all layers at each target density;
   - mask-aware fine-tuning (``finetune_epochs`` of :func:`selact.train.fit` on the converted
     model) of the (strategy, group, density) cases in ``finetune``, and a dense fine-tuning
     control (the dense model trained as long, with the same schedule);
3. ``results/voc/det.json`` (rows of every scale; a run replaces the rows of its own scale),
   ``det-<scale>.md`` (table and summary), ``det-<scale>-map-vs-macs.png`` and
   ``det-<scale>-detections.png`` (val images, dense and selective side by side).

MAC accounting: every convertible layer but the stem and the head's predictors is converted in
every row but ``dense``; the layers outside a row's group run with the ``dense`` strategy (keep
all inputs), so all rows count the same layers, and a converted layer's executed MACs skip zero
inputs (docs/method.md). Fractions are of the dense MACs of the whole model, stem and predictors
included; the attention products (QKᵀ, PV) have no weights and are not counted.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selact
from selact._provenance import commit
from selact.config import SelectiveConfig
from selact.models import create_model
from selact.models.det import layer_filter
from selact.train import TaskOptions, TrainConfig, create_task, fit, hardware, load_model
from selact.train.checkpoint import read_sidecar
from selact.train.loop import evaluate

__all__ = [
    "SweepConfig",
    "SCALES",
    "Row",
    "run_sweep",
    "train_dense",
    "row_model",
    "evaluate_one",
]

log = logging.getLogger(__name__)

SCALES = ("full", "cpu", "smoke")
GROUPS = ("conv", "attn_linear", "all")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Every setting of a VOC sweep; :meth:`for_scale` gives the defaults of each scale."""

    scale: str = "cpu"  # model preset and schedule: "full" (GPU), "cpu" or "smoke"
    data: str | None = None  # VOC archive or VOCdevkit tree; None: $SELACT_DATA
    device: str = "cpu"
    seed: int = 0  # weight init, data order, augmentation
    # dense training
    epochs: int = 18  # cpu: about 20 min on one shared core at 128 px
    batch_size: int = 32
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    grad_clip: float | None = 10.0  # FCOS's losses spike early in training from scratch
    eval_every: int = 6  # evaluate val every this many epochs during training
    # the sweep
    targets: tuple[float, ...] = (0.5, 0.35, 0.3, 0.25)  # densities without fine-tuning
    granularity: str = "element"
    finetune_epochs: int = 1
    finetune_lr: float = 2e-4  # AdamW, cosine to zero after 5 % warmup
    finetune: tuple[tuple[str, str, float], ...] = (
        ("sapi", "all", 0.25),
        ("sapw", "all", 0.25),
        ("sapi", "all", 0.3),
    )  # (strategy, layer group, density) cases that get mask-aware fine-tuning
    dense_control: bool = True  # also fine-tune the dense model as long (the control)
    train_limit: int | None = None  # first N train images (smoke)
    eval_limit: int | None = None  # first N val images (smoke)
    num_workers: int | None = None  # loader workers (None: 0 on the CPU, up to 8 on CUDA)
    amp: str = "auto"  # bf16 autocast on CUDA
    run_dir: str | None = None  # default runs/voc/det-<scale>
    out: str | None = None  # results JSON (its folder gets the table and pictures); None: none

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        for strategy, group, density in self.finetune:
            if group not in GROUPS or not 0 < density <= 1:
                raise ValueError(f"bad fine-tuning case {(strategy, group, density)}")
        if self.scale == "smoke" and self.out and "results" in Path(self.out).parts:
            raise ValueError("smoke runs never write to results/")

    @classmethod
    def for_scale(cls, scale: str, **changes: Any) -> SweepConfig:
        """The defaults of ``scale``: ``cpu`` (reduced, 2 CPU cores), ``full`` (one GPU, the
        whole sweep in about 10 minutes) or ``smoke`` (a few images, tiny input, seconds)."""
        base: dict[str, Any] = {"scale": scale}
        if scale == "full":
            # Not yet measured on a GPU: sized from the CPU timings to fit about 10 minutes of
            # one H100 (dense training, 30 evaluations and 7 fine-tuning runs of 2 epochs).
            base.update(
                device="cuda",
                epochs=30,
                batch_size=64,
                lr=3e-3,
                eval_every=10,
                targets=(0.5, 0.35, 0.25, 0.15),
                finetune_epochs=2,
                finetune=tuple(
                    (strategy, group, 0.25) for group in GROUPS for strategy in ("sapi", "sapw")
                ),
            )
        elif scale == "cpu":
            # One fine-tuning epoch recovered 0.1-0.4 pt (measured); four, on the cases
            # around the frontier, SAPI against SAPW at equal density.
            base.update(
                finetune_epochs=4,
                finetune=(("sapi", "all", 0.3), ("sapw", "all", 0.3), ("sapi", "all", 0.25)),
            )
        elif scale == "smoke":
            base.update(
                epochs=1,
                batch_size=4,
                eval_every=0,
                targets=(0.5,),
                finetune=(("sapi", "all", 0.5),),
                train_limit=8,
                eval_limit=4,
            )
        return cls(**{**base, **changes})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/voc/det-{self.scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Row:
    """One evaluated detector of the sweep."""

    strategy: str
    layers: str  # "none" (dense), "conv", "attn_linear" or "all"
    granularity: str
    target_density: float
    finetune_epochs: int

    @property
    def key(self) -> str:
        return (
            f"{self.strategy}-{self.layers}-{self.granularity}-{self.target_density:g}"
            f"-ft{self.finetune_epochs}"
        )


def _task(config: SweepConfig):
    options = TaskOptions(
        data=config.data,
        device=config.device,
        train_limit=config.train_limit,
        eval_limit=config.eval_limit,
    )
    preset = "cpu" if config.scale == "cpu" else config.scale
    return create_task("voc", options, preset=preset, num_workers=config.num_workers)


def _dense_train_config(config: SweepConfig) -> TrainConfig:
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer="adamw",
        lr=config.lr,
        weight_decay=config.weight_decay,
        schedule="cosine",
        warmup=config.warmup,
        grad_clip=config.grad_clip,
        amp=config.amp,
        seed=config.seed,
        eval_every=config.eval_every,
        eval_batch_size=64,
    )


def _finetune_config(config: SweepConfig) -> TrainConfig:
    return _dense_train_config(config).replace(
        epochs=config.finetune_epochs, lr=config.finetune_lr, eval_every=0
    )


def _new_model(task, config: SweepConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    return create_model("det", **task.model_kwargs())


def train_dense(
    task, config: SweepConfig, *, progress: bool = True, command: str = ""
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """Train (or resume, or load the finished) dense detector; return it, its checkpoint and
    sidecar."""
    run_dir = config.run_path / "dense"
    train_config = _dense_train_config(config)
    checkpoint = run_dir / "model.safetensors"
    model = _new_model(task, config)
    if checkpoint.is_file():
        info = read_sidecar(checkpoint)
        if train_config.matches(info.get("config")):
            model, info = load_model(model, checkpoint)
            log.info("dense detector: loaded %s", checkpoint)
            return model.to(task.device), checkpoint, info
    result = fit(
        task,
        model,
        train_config,
        run_dir=run_dir,
        progress=progress,
        info={"command": command, "model": "det", "task": "voc", "scale": config.scale},
        final_splits=("val",),
    )
    return result.model, checkpoint, read_sidecar(checkpoint)


def _dense_outside(model: nn.Module, group: str) -> dict[str, Any]:
    """Overrides that keep every converted layer outside ``group`` at the ``dense`` strategy."""
    inside, every = layer_filter(group), layer_filter("all")
    return {
        f"re:{re.escape(name)}(\\..*)?": {"strategy": "dense"}
        for name, module in model.named_modules()
        if every(module, name) and not inside(module, name)
    }


def row_model(dense: nn.Module, row: Row) -> nn.Module:
    """A copy of ``dense`` converted as ``row`` says (before any fine-tuning)."""
    model = copy.deepcopy(dense)
    config = SelectiveConfig(
        strategy=row.strategy, density=row.target_density, granularity=row.granularity
    )
    if row.layers == "none":
        # The plain model, converted with the ``dense`` strategy (keep every input) only so that
        # stats count the attention's projections, which an unconverted MultiheadAttention's
        # fused path hides from the dense counters. Its executed MACs are the dense MACs.
        config = config.replace(strategy="dense")
    overrides = _dense_outside(model, row.layers) if row.layers in GROUPS[:2] else None
    return selact.sparsify(model, config, filter_fn=layer_filter("all"), overrides=overrides)


def _rows(config: SweepConfig) -> list[Row]:
    g = config.granularity
    rows = [Row("dense", "none", g, 1.0, 0), Row("zero_skip", "all", g, 1.0, 0)]
    for group in GROUPS:
        for strategy in ("sapi", "sapw"):
            rows += [Row(strategy, group, g, d, 0) for d in config.targets]
    rows += [Row("random", "all", g, d, 0) for d in config.targets]
    if config.finetune_epochs > 0:
        rows += [Row(s, grp, g, d, config.finetune_epochs) for s, grp, d in config.finetune]
        if config.dense_control:
            rows.append(Row("dense", "none", g, 1.0, config.finetune_epochs))
    return rows


def _evaluate_row(
    task, dense: nn.Module, dense_sha: str, row: Row, config: SweepConfig, progress: bool
) -> tuple[dict[str, Any], nn.Module]:
    model = row_model(dense, row)
    sha, ft_seconds = dense_sha, 0.0
    if row.finetune_epochs:
        run_dir = config.run_path / f"ft-{row.key}"
        ft_config = _finetune_config(config)
        checkpoint = run_dir / "model.safetensors"
        info = read_sidecar(checkpoint) if checkpoint.is_file() else {}
        if ft_config.matches(info.get("config")):
            model, info = load_model(copy.deepcopy(dense), checkpoint)
        else:
            if row.layers == "none":
                selact.densify(model)  # the control trains the plain model
            result = fit(
                task,
                model,
                ft_config,
                run_dir=run_dir,
                progress=progress,
                info={"row": row.key, "dense_checkpoint_sha256": dense_sha},
                final_splits=(),
            )
            model, info = result.model, read_sidecar(checkpoint)
        if row.layers == "none":  # converted with the dense strategy, for counting only
            model = row_model(selact.densify(model), Row("dense", "none", row.granularity, 1, 0))
        sha, ft_seconds = info.get("sha256", ""), float(info.get("train_seconds", 0.0))
    model.to(task.device)
    selact.reset_stats(model)
    torch.manual_seed(config.seed)  # the random baseline's masks
    start = time.perf_counter()
    metrics = evaluate(task, model, "val", _dense_train_config(config))
    eval_seconds = time.perf_counter() - start
    total = selact.stats(model).total
    executed = total.dense_macs if row.layers == "none" else total.executed_macs
    values = {
        "strategy": row.strategy,
        "layers": row.layers,
        "granularity": row.granularity,
        "target_density": row.target_density,
        "executed_mac_fraction": executed / total.dense_macs,
        "zero_skip_mac_fraction": total.zero_skip_fraction,
        "executed_over_zero_skip": executed / total.zero_skip_macs,
        "measured_density": total.density,
        "dense_macs_per_image": total.dense_macs / len(task.datasets["val"]),
        "map50": metrics["map50"],
        "map50_07": metrics["map50_07"],
        "coco_map": metrics.get("coco_map"),
        "coco_map50": metrics.get("coco_map50"),
        "finetune_epochs": row.finetune_epochs,
        "finetune_seconds": ft_seconds,
        "eval_seconds": eval_seconds,
        "checkpoint_sha256": sha,
        "key": row.key,
    }
    return values, model


def evaluate_one(
    config: SweepConfig,
    row: Row,
    *,
    progress: bool = True,
    command: str = "",
    predictions: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """One row of the sweep on its own (``selact eval`` / ``selact finetune``): the dense
    detector is trained or loaded as in :func:`run_sweep`, then ``row`` is converted, fine-tuned
    if it asks, and evaluated on val. ``predictions`` saves the val detections and truth (for
    ``SELACT_VOC_PREDICTIONS``, see tests/test_metrics_voc.py)."""
    task = _task(config)
    dense, _, info = train_dense(task, config, progress=progress, command=command)
    values, _ = _evaluate_row(task, dense, info.get("sha256", ""), row, config, progress)
    if predictions is not None:
        Path(predictions).parent.mkdir(parents=True, exist_ok=True)
        torch.save(task.last_predictions, predictions)
    return {**values, "seed": config.seed, "scale": config.scale, "command": command}


def run_sweep(config: SweepConfig, *, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run the whole sweep (see the module docstring); return the results document."""
    from selact.experiments import voc_report

    config.run_path.mkdir(parents=True, exist_ok=True)
    task = _task(config)
    start = time.perf_counter()
    dense, checkpoint, info = train_dense(task, config, progress=progress, command=command)
    dense_sha = info.get("sha256", "")
    done_path = config.run_path / "rows.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if done_path.is_file():
        for line in done_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("checkpoint_base") == dense_sha:
                done[record["key"]] = record
    common = {
        "seed": config.seed,
        "scale": config.scale,
        "hardware": hardware(task.device),
        "command": command,
        "commit": commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": "VOC2007 test images, project split: train on train (3,961), report on val (991)"
        if config.train_limit is None
        else f"VOC{task.year} first {config.train_limit} train / {config.eval_limit} val images",
    }
    rows = []
    for row in _rows(config):
        if row.key in done:
            rows.append(done[row.key])
            continue
        values, model = _evaluate_row(task, dense, dense_sha, row, config, progress)
        if row.key == Row("dense", "none", config.granularity, 1.0, 0).key:
            torch.save(task.last_predictions, config.run_path / "dense_val_predictions.pt")
        record = {**values, **common, "checkpoint_base": dense_sha}
        log.info(
            "%s: mAP@0.5 %.4f, executed %.3f of dense MACs",
            row.key,
            record["map50"],
            record["executed_mac_fraction"],
        )
        with open(done_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        rows.append(record)
        del model
    document = {
        "experiment": "voc-det-sweep",
        "scale": config.scale,
        "config": config.to_dict(),
        "dense": {
            "map50": rows[0]["map50"],
            "train_seconds": info.get("train_seconds"),
            "epochs": info.get("epochs"),
            "hardware": info.get("hardware"),
            "checkpoint_sha256": dense_sha,
            "history": info.get("history"),
        },
        "summary": voc_report.summarize(rows),
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    if config.out:
        voc_report.write(document, Path(config.out), task, dense, config)
    return document
