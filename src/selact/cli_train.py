"""``selact train|finetune|eval|sweep|report``: the command-line layer over :mod:`selact.train`
and :mod:`selact.experiments.sweep`, generic over registered tasks.

A task whose commands need options of their own registers a module in ``TASK_COMMANDS``
(:mod:`selact.cli` routes ``--task NAME`` there); every other registered task is served here.
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

import selact
from selact._files import atomic_write_text
from selact.experiments.recipes import SCALES, recipe
from selact.models import create_model
from selact.train import (
    TaskOptions,
    TrainConfig,
    create_task,
    distributed_context,
    evaluate,
    fit,
    load_model,
)

__all__ = ["TASK_COMMANDS", "register"]

#: Tasks whose train|finetune|eval|sweep have options of their own: task -> module holding
#: ``train``, ``finetune``, ``evaluate`` and ``sweep`` (Typer command functions).
TASK_COMMANDS = {"voc": "selact.experiments.voc_commands"}

Task = Annotated[str, typer.Option(help="Task name (selact.train.list_tasks()).")]
Model = Annotated[str, typer.Option(help="Model name: resnet20, vgg16, vit, torchvision:<name>...")]
Data = Annotated[
    str | None, typer.Option(help="Data: a folder or an archive (default: $SELACT_DATA).")
]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (CUDA if present).")]
Scale = Annotated[str, typer.Option(help=f"Recipe scale: {', '.join(SCALES)}.")]
Smoke = Annotated[bool, typer.Option(help="A few hundred images, one epoch (= --scale smoke).")]
TaskArg = Annotated[
    list[str] | None,
    typer.Option(help="Task setting KEY=VALUE (JSON value), e.g. cutout=8; repeatable."),
]
RunDir = Annotated[Path | None, typer.Option(help="Checkpoint folder (default runs/<...>).")]
Progress = Annotated[bool, typer.Option(help="Progress bars on stderr.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")]


def _command() -> str:
    return "selact " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _device(name: str) -> str:
    _, world, local_rank = distributed_context()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        name = f"cuda:{local_rank}"
    return name


def _task_args(pairs: list[str] | None, base: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--task-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _build(task: str, model: str, data, device, scale, task_arg, finetuning: bool = False):
    """The recipe and the task, with the recipe's settings (fine-tuning's where ``finetuning``)
    and ``--task-arg`` over them."""
    rec = recipe(model, scale)
    settings = rec.finetune_settings() if finetuning else rec.task_args
    options = TaskOptions(
        data=data,
        device=device,
        train_limit=rec.train_limit,
        eval_limit=rec.eval_limit,
        channels_last=device.startswith("cuda"),
    )
    try:
        built = create_task(task, options, **_task_args(task_arg, settings))
    except (FileNotFoundError, ValueError, KeyError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    return rec, built


def _train_config(base: TrainConfig, **fields: Any) -> TrainConfig:
    return base.replace(**{k: v for k, v in fields.items() if v is not None})


def _print_metrics(title: str, metrics: dict[str, dict[str, float]]) -> None:
    table = Table(title=title)
    table.add_column("split")
    keys = sorted({k for m in metrics.values() for k in m})
    for key in keys:
        table.add_column(key, justify="right")
    for split, values in metrics.items():
        table.add_row(split, *(f"{values.get(k, float('nan')):.4f}" for k in keys))
    Console().print(table)


def _is_main() -> bool:
    return distributed_context()[0] == 0


def train(
    task: Task = "cifar10",
    model: Model = "resnet20",
    data: Data = None,
    device: Device = "auto",
    scale: Scale = "full",
    smoke: Smoke = False,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the recipe's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per process.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd or adamw.")] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    ema: Annotated[float | None, typer.Option(help="EMA decay per step (0: off).")] = None,
    amp: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or off.")] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(help="Stretch the schedule over this many seconds (evaluations included)."),
    ] = None,
    checkpoint_seconds: Annotated[
        float | None,
        typer.Option(help="Write the training state at most once per this many seconds."),
    ] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the training model.")] = False,
    cuda_graph: Annotated[
        bool | None,
        typer.Option(
            help="Replay forward and backward as CUDA graphs on one GPU (default: the recipe's: "
            "on at full scale)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of init, data order, augmentation.")] = 0,
    task_arg: TaskArg = None,
    run_dir: RunDir = None,
    resume: Annotated[bool, typer.Option(help="Continue from run-dir's last state.")] = True,
    progress: Progress = True,
    json_out: JsonOut = None,
) -> None:
    """Train a dense model (resumable; runs under torchrun with DDP)."""
    scale = "smoke" if smoke else scale
    device = _device(device)
    rec, built = _build(task, model, data, device, scale, task_arg)
    config = _train_config(
        rec.dense,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        ema=ema,
        amp=amp,
        time_limit=time_limit,
        checkpoint_seconds=checkpoint_seconds,
        compile=compile or None,
        cuda_graph=cuda_graph,
        seed=seed,
    )
    run_dir = run_dir or Path("runs") / "train" / f"{task}-{model}-{scale}-s{seed}"
    torch.manual_seed(seed)
    net = create_model(model, **built.model_kwargs())
    result = fit(
        built,
        net,
        config,
        run_dir=run_dir,
        resume=resume,
        progress=progress,
        info={"model": model, "command": _command(), "scale": scale},
    )
    if _is_main():
        _print_metrics(f"{model} on {task} ({result.train_seconds:.0f} s)", result.metrics)
        Console().print(f"wrote {result.checkpoint}")
        if json_out:
            atomic_write_text(json_out, json.dumps(result.info, indent=1, default=str) + "\n")


def finetune(
    task: Task = "cifar10",
    model: Model = "resnet20",
    from_: Annotated[
        Path, typer.Option("--from", help="Dense checkpoint (model.safetensors of `train`).")
    ] = Path("runs/train/model.safetensors"),
    strategy: Annotated[str, typer.Option(help="sapi, sapw, random, or dense (control).")] = "sapi",
    granularity: Annotated[str, typer.Option(help="element, block, channel, ...")] = "element",
    density: Annotated[
        float | None, typer.Option(help="One density for every selective layer.")
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(help="Executed/dense MAC target instead of --density (searched on val)."),
    ] = None,
    allocation: Annotated[
        str, typer.Option(help="With --target: global (greedy by sensitivity) or uniform.")
    ] = "global",
    densities: Annotated[
        Path | None,
        typer.Option(
            help="Per-layer densities instead of --density/--target: an earlier run's --json "
            "(its searched densities, e.g. for another seed) or a {layer: density} JSON."
        ),
    ] = None,
    data: Data = None,
    device: Device = "auto",
    scale: Scale = "full",
    smoke: Smoke = False,
    epochs: Annotated[int | None, typer.Option(help="Default: the recipe's.")] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    distill: Annotated[float | None, typer.Option(help="Distillation weight (0: off).")] = None,
    density_schedule: Annotated[
        str | None, typer.Option(help="constant, linear or cosine (from 1.0 to the target).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    task_arg: TaskArg = None,
    run_dir: RunDir = None,
    resume: Annotated[bool, typer.Option()] = True,
    progress: Progress = True,
    json_out: JsonOut = None,
) -> None:
    """Mask-aware fine-tuning of a dense checkpoint (masks recomputed every step)."""
    from selact.amu import budget_search, uniform_search
    from selact.experiments.sweep import calibration_batches, converted_copy

    scale = "smoke" if smoke else scale
    if densities is not None and (density is not None or target is not None):
        raise typer.BadParameter("give one of --densities, --density and --target")
    fields: dict[str, Any] = _read_densities(densities) if densities is not None else {}
    device = _device(device)
    rec, built = _build(task, model, data, device, scale, task_arg, finetuning=True)
    dense, _ = load_model(create_model(model, **built.model_kwargs()), from_)
    dense.to(device).eval()
    if strategy == "dense":
        net = copy.deepcopy(dense)
    elif fields:
        net = converted_copy(dense, strategy, granularity)
        selact.amu.apply_densities(net, fields["densities"])
    elif target is not None:
        net = converted_copy(dense, strategy, granularity)
        searching: dict[str, Any] = {"sensitivity": built.sensitivity}
        if allocation == "global":  # searched as the sweep searches (the recipe's settings)
            search = budget_search
            searching |= {"max_steps": rec.search_steps, "refresh": rec.search_refresh}
        else:
            search = uniform_search
        with selact.train.autocast(rec.dense, torch.device(device)):
            result = search(net, calibration_batches(built, rec), [target], **searching)
        selact.amu.apply_densities(net, result[0].densities)
        fields = {"target_mac_fraction": target, "densities": result[0].densities}
    else:
        net = converted_copy(dense, strategy, granularity, density=density or 0.5)
    config = _train_config(
        rec.finetune,
        epochs=epochs,
        lr=lr,
        distill=distill,
        density_schedule=density_schedule,
        seed=seed,
    )
    run_dir = run_dir or Path("runs") / "finetune" / f"{task}-{model}-{strategy}-s{seed}"
    info = {"model": model, "command": _command(), "strategy": strategy, **fields}
    fitted = fit(
        built, net, config, run_dir=run_dir, teacher=dense, resume=resume, progress=progress,
        info=info,
    )  # fmt: skip
    if _is_main():
        _print_metrics(f"{model} {strategy} fine-tuned", fitted.metrics)
        Console().print(f"wrote {fitted.checkpoint}")
        if json_out:
            atomic_write_text(json_out, json.dumps(fitted.info, indent=1, default=str) + "\n")


def _read_densities(path: Path) -> dict[str, Any]:
    """:func:`selact.amu.read_densities`, its errors as the CLI's."""
    try:
        return selact.amu.read_densities(path)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


def evaluate_command(
    checkpoint: Annotated[Path, typer.Option(help="A model.safetensors (dense or converted).")],
    task: Task = "cifar10",
    model: Model = "resnet20",
    split: Annotated[list[str] | None, typer.Option(help="Splits (default: val and test).")] = None,
    data: Data = None,
    device: Device = "auto",
    scale: Scale = "full",
    smoke: Smoke = False,
    task_arg: TaskArg = None,
    json_out: JsonOut = None,
) -> None:
    """Evaluate a checkpoint: metrics and executed/zero-skipping/dense MACs per split."""
    scale = "smoke" if smoke else scale
    device = _device(device)
    rec, built = _build(task, model, data, device, scale, task_arg)
    net, _ = load_model(create_model(model, **built.model_kwargs()), checkpoint)
    net.to(device).eval()
    if not any(isinstance(m, selact.SelectiveModule) for m in net.modules()):
        selact.sparsify(net, filter_fn=lambda module, name: False)  # count every layer dense
    out: dict[str, Any] = {}
    for name in split or [s for s in built.splits if s != "train"]:
        selact.reset_stats(net)
        metrics = evaluate(built, net, name, rec.dense)
        total = selact.stats(net).total
        out[name] = {
            **metrics,
            "executed_mac_fraction": total.executed_fraction,
            "zero_skip_mac_fraction": total.zero_skip_fraction,
        }
    _print_metrics(f"{checkpoint}", out)
    if json_out:
        atomic_write_text(json_out, json.dumps(out, indent=1) + "\n")


def sweep(
    task: Task = "cifar10",
    model: Model = "resnet20",
    data: Data = None,
    device: Device = "auto",
    scale: Scale = "full",
    smoke: Smoke = False,
    time_budget: Annotated[
        float | None, typer.Option(help="Seconds for the whole sweep (jobs in priority order).")
    ] = None,
    dense_share: Annotated[
        float, typer.Option(help="Share of the time budget for dense training.")
    ] = 0.45,
    dense_checkpoint: Annotated[
        str | None, typer.Option(help="Reuse this dense model instead of training one.")
    ] = None,
    seeds: Annotated[str, typer.Option(help="Fine-tuning seeds, comma-separated.")] = "0,1,2",
    max_finetunes: Annotated[int | None, typer.Option(help="At most this many.")] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="AMU strategy fine-tuned first, with 3 seeds (sapi or sapw; default: the "
            "recipe's, sapi for CNNs, sapw for the ViT)."
        ),
    ] = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(min=1, help="Fine-tuning epochs (default: the recipe's).")
    ] = None,
    frontier: Annotated[
        float | None,
        typer.Option(
            help="Executed/dense MAC target fine-tuned with every seed (default: the recipe's: "
            "1/3 ResNet-20, 1/4 VGG-16, 1/2 ViT)."
        ),
    ] = None,
    task_arg: TaskArg = None,
    finetune_task_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="Task setting KEY=VALUE for fine-tuning only, over --task-arg and the recipe's "
            "(the ViT's: no MixUp, CutMix or TrivialAugment); repeatable."
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(help="Rows JSON (default results/<task>/<model>.json; smoke: runs/)."),
    ] = None,
    md: Annotated[Path | None, typer.Option(help="Also write the Markdown table here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Also write the plot here.")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Checkpoint folder.")] = None,
    resume: Annotated[bool, typer.Option(help="Reuse finished runs in run-dir.")] = True,
    progress: Progress = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes running jobs at once: after the dense model, N-1 more `selact sweep "
            "--shard i/N` processes, their rows merged into --out.",
        ),
    ] = 1,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/K: run only the jobs j of the plan with j % K == I (0-based); I > 0 needs "
            "--dense-checkpoint and writes no dense rows."
        ),
    ] = None,
    done_rows: Annotated[
        str | None,
        typer.Option(
            help="Rows of an earlier sweep (its --out): the jobs it holds for the same dense "
            "checkpoint are not run again (its rows are not copied to --out)."
        ),
    ] = None,
    search_dir: Annotated[
        str | None,
        typer.Option(help="Budget searches shared by the shards (default <run-dir>/searches)."),
    ] = None,
    mac_step: Annotated[
        float, typer.Option(help="Budget search: MAC fraction saved per greedy step.")
    ] = 0.01,
    commit: Annotated[
        str | None, typer.Option(help="Commit recorded in rows (default: $SELACT_COMMIT, git).")
    ] = None,
    command: Annotated[
        str | None, typer.Option(hidden=True, help="Command recorded in rows.")
    ] = None,
) -> None:
    """Dense, zero-skipping, SAPI/SAPW/random at several MAC targets, with and without
    fine-tuning, and the dense fine-tuning control; writes one JSON row per result.
    --workers N runs the jobs in N processes once the dense model exists."""
    from selact.experiments.report import markdown, plot
    from selact.experiments.sweep import SweepConfig, default_out, parse_shard, run_sweep

    scale = "smoke" if smoke else scale
    try:
        parsed_shard = None if shard is None else parse_shard(shard)
    except ValueError as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    config = SweepConfig(
        task=task,
        model=model,
        scale=scale,
        data=data,
        device=_device(device),
        out=out,
        run_dir=run_dir,
        dense_checkpoint=dense_checkpoint,
        time_budget=time_budget,
        dense_share=dense_share,
        seeds=tuple(int(s) for s in seeds.split(",")),
        max_finetunes=max_finetunes,
        mac_step=mac_step,
        command=_command() if command is None else command,
        commit=commit,
        progress=progress,
        resume=resume,
        workers=workers,
        shard=parsed_shard,
        search_dir=search_dir,
        done_rows=done_rows,
        strategy=strategy,
        finetune_epochs=finetune_epochs,
        frontier=frontier,
        task_args=_task_args(task_arg, {}),
        finetune_task_args=_task_args(finetune_task_arg, {}),
    )
    try:
        rows = run_sweep(config)
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    text = markdown(rows, tolerance={"vit": 0.005})
    Console().print(text)
    Console().print(f"wrote {config.out or default_out(task, model, scale)}")
    if md:
        atomic_write_text(md, text)
    if png:
        plot(rows, png)


def report(
    files: Annotated[list[Path], typer.Argument(help="Sweep JSON files.")],
    md: Annotated[Path | None, typer.Option(help="Write the Markdown here.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write the plot here.")] = None,
) -> None:
    """Tables (mean ± std over seeds), the frontier and the plot of sweep results."""
    from selact.experiments.report import load_rows, markdown, plot

    rows = load_rows(files)
    text = markdown(rows, tolerance={"vit": 0.005})
    if md:
        atomic_write_text(md, text)
    else:
        typer.echo(text)
    if png:
        plot(rows, png)


def register(app: typer.Typer) -> None:
    """Add the commands to ``app``."""
    app.command("train")(train)
    app.command("finetune")(finetune)
    app.command("eval")(evaluate_command)
    app.command("sweep")(sweep)
    app.command("report")(report)
