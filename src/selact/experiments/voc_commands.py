"""``selact train|finetune|eval|sweep --task voc --model det``: the command-line layer of
:mod:`selact.experiments.voc_sweep` (each command is one call of its Python API).

Every command shares the sweep's run folder (``runs/voc/det-<scale>``), so ``train`` makes the
dense detector that ``finetune``, ``eval`` and ``sweep`` then load, and any command stopped
midway resumes where it stopped when run again.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from selact.experiments.voc_sweep import (
    SCALES,
    Row,
    SweepConfig,
    _task,
    evaluate_one,
    run_sweep,
    train_dense,
)

__all__ = ["train", "finetune", "evaluate", "sweep"]

Task = Annotated[str, typer.Option(help="The task: voc (Pascal VOC detection).")]
Model = Annotated[str, typer.Option(help="The model: det.")]
Scale = Annotated[
    str,
    typer.Option(help=f"Model size and schedule: {', '.join(SCALES)} (see docs/voc.md)."),
]
Data = Annotated[
    str | None,
    typer.Option(help="VOC: the archive, a folder holding it, or a VOCdevkit tree ($SELACT_DATA)."),
]
Smoke = Annotated[
    bool, typer.Option(help="A few images, tiny input, one epoch: seconds (same as --scale smoke).")
]
Epochs = Annotated[int | None, typer.Option(help="Dense training epochs (default: the scale's).")]
Seed = Annotated[int, typer.Option(help="Seed of init, data order and augmentation.")]
Threads = Annotated[
    int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")
]
RunDir = Annotated[str | None, typer.Option(help="Checkpoints (default runs/voc/det-<scale>).")]
Progress = Annotated[bool, typer.Option(help="Progress bars on stderr.")]


def _config(task: str, model: str, scale: str, smoke: bool, threads: int | None, **fields):
    if task != "voc" or model != "det":
        raise typer.BadParameter(f"this command serves --task voc --model det, not {task}/{model}")
    if threads:
        torch.set_num_threads(threads)
    fields = {k: v for k, v in fields.items() if v is not None}
    config = SweepConfig.for_scale("smoke" if smoke else scale, **fields)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--scale full trains on CUDA; none is present (use --device cpu)")
    return config


def _command() -> str:
    return "selact " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def train(
    task: Task = "voc",
    model: Model = "det",
    scale: Scale = "cpu",
    data: Data = None,
    epochs: Epochs = None,
    seed: Seed = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    smoke: Smoke = False,
    threads: Threads = None,
    run_dir: RunDir = None,
    progress: Progress = True,
) -> None:
    """Train the dense detector (resumable); print its val mAP@0.5."""
    config = _config(
        task, model, scale, smoke, threads, data=data, epochs=epochs, seed=seed, device=device,
        run_dir=run_dir,
    )  # fmt: skip
    voc = _task(config)
    start = time.perf_counter()
    _, checkpoint, info = train_dense(voc, config, progress=progress, command=_command())
    metrics = info.get("metrics", {}).get("val", {})
    Console().print(
        f"dense det ({config.scale}): val mAP@0.5 {100 * metrics.get('map50', float('nan')):.2f} %"
        f", trained {info.get('train_seconds', 0) / 60:.1f} min on {info.get('hardware')}; "
        f"{checkpoint} ({time.perf_counter() - start:.0f} s in this call)"
    )


def _row_command(
    task, model, scale, data, strategy, layers, density, granularity, finetune_epochs, seed,
    device, smoke, threads, run_dir, progress, predictions,
):  # fmt: skip
    config = _config(
        task, model, scale, smoke, threads, data=data, seed=seed, device=device, run_dir=run_dir,
        finetune_epochs=finetune_epochs or None, granularity=granularity,
    )  # fmt: skip
    if strategy == "dense":
        layers, density = "none", 1.0
    row = Row(strategy, layers, granularity, density, finetune_epochs)
    result = evaluate_one(
        config, row, progress=progress, command=_command(), predictions=predictions
    )
    typer.echo(json.dumps(result, indent=1, default=str))


Strategy = Annotated[str, typer.Option(help="sapi, sapw, random, zero_skip or dense.")]
Layers = Annotated[str, typer.Option(help="Layer group: conv, attn_linear or all.")]
Density = Annotated[float, typer.Option(help="Fraction of each layer's inputs kept.")]
Granularity = Annotated[str, typer.Option(help="element, block, channel, spatial, ...")]


def finetune(
    task: Task = "voc",
    model: Model = "det",
    strategy: Strategy = "sapi",
    layers: Layers = "all",
    density: Density = 0.25,
    epochs: Annotated[int, typer.Option(help="Mask-aware fine-tuning epochs.")] = 1,
    granularity: Granularity = "element",
    scale: Scale = "cpu",
    data: Data = None,
    seed: Seed = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    smoke: Smoke = False,
    threads: Threads = None,
    run_dir: RunDir = None,
    progress: Progress = True,
) -> None:
    """Convert the dense detector, fine-tune it mask-aware (resumable), evaluate on val."""
    _row_command(
        task, model, scale, data, strategy, layers, density, granularity, epochs, seed, device,
        smoke, threads, run_dir, progress, None,
    )  # fmt: skip


def evaluate(
    task: Task = "voc",
    model: Model = "det",
    strategy: Strategy = "dense",
    layers: Layers = "all",
    density: Density = 1.0,
    granularity: Granularity = "element",
    scale: Scale = "cpu",
    data: Data = None,
    seed: Seed = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    smoke: Smoke = False,
    threads: Threads = None,
    run_dir: RunDir = None,
    progress: Progress = True,
    predictions: Annotated[
        Path | None, typer.Option(help="Save the val detections and truth (torch.save) here.")
    ] = None,
) -> None:
    """Evaluate the dense detector, or a conversion of it, on val: mAP and MACs."""
    _row_command(
        task, model, scale, data, strategy, layers, density, granularity, 0, seed, device,
        smoke, threads, run_dir, progress, predictions,
    )  # fmt: skip


def sweep(
    task: Task = "voc",
    model: Model = "det",
    scale: Scale = "cpu",
    data: Data = None,
    epochs: Epochs = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Mask-aware fine-tuning epochs per fine-tuned row.")
    ] = None,
    seed: Seed = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    smoke: Smoke = False,
    threads: Threads = None,
    run_dir: RunDir = None,
    out: Annotated[
        str | None,
        typer.Option(help="Results JSON (default results/voc/det.json; smoke: none)."),
    ] = None,
    progress: Progress = True,
) -> None:
    """Dense training, then SAPI/SAPW per layer group, baselines and fine-tuning (resumable)."""
    scale_name = "smoke" if smoke else scale
    if out is None and scale_name != "smoke":
        out = "results/voc/det.json"
    config = _config(
        task, model, scale, smoke, threads, data=data, epochs=epochs,
        finetune_epochs=finetune_epochs, seed=seed, device=device, run_dir=run_dir, out=out,
    )  # fmt: skip
    document = run_sweep(config, progress=progress, command=_command())
    summary = document["summary"]
    console = Console()
    console.print(f"dense val mAP@0.5 {100 * summary['dense_map50']:.2f} %")
    best = summary["best_within_tolerance"]
    if best:
        console.print(
            f"cheapest within 0.5 pt: {best['key']} at {best['executed_mac_fraction']:.3f} of "
            f"dense MACs, mAP@0.5 {100 * best['map50']:.2f} %"
        )
    console.print(f"{len(document['rows'])} rows" + (f"; wrote {config.out}" if config.out else ""))
