"""The ``selact`` command: a thin layer over :mod:`selact.experiments` that prints tables.

The only module that writes to the terminal: results go to stdout, progress and logs to stderr.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from typer.core import TyperGroup

from selact import cli_train
from selact._files import atomic_write_text
from selact.bench.cli import app as bench_app
from selact.experiments.demo import DemoConfig, DemoResult, run_demo

_ROUTED = {"train": "train", "finetune": "finetune", "eval": "evaluate", "sweep": "sweep"}


class _TaskGroup(TyperGroup):
    """Sends ``train|finetune|eval|sweep --task NAME`` to the task's own commands when
    ``cli_train.TASK_COMMANDS`` names a module for it; every other task uses the generic ones."""

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        task = _option(rest, "--task")
        if name in _ROUTED and task in cli_train.TASK_COMMANDS:
            module = importlib.import_module(cli_train.TASK_COMMANDS[task])
            sub = typer.Typer()
            sub.command(name)(getattr(module, _ROUTED[name]))
            command = typer.main.get_command(sub)
        return name, command, rest


def _option(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


app = typer.Typer(help="Selective activation for PyTorch.", no_args_is_help=True, cls=_TaskGroup)
app.add_typer(bench_app, name="bench")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Selective activation for PyTorch: keep only a layer's important inputs."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )


def _table(result: DemoResult) -> Table:
    table = Table(
        title=f"{result.config.model} on CIFAR-10 (JPEG copy), test top-1",
        caption="MACs: exec = executed, zs = zero-skipping, dense = all",
    )
    for name in ("strategy", "density", "top-1 %", "exec/dense", "zs/dense", "exec/zs"):
        table.add_column(name, justify="left" if name == "strategy" else "right", no_wrap=True)
    for row in result.rows:
        table.add_row(
            row.strategy,
            f"{row.density:.2f}",
            f"{100 * row.top1:.2f}",
            f"{row.executed_mac_fraction:.3f}",
            f"{row.zero_skip_mac_fraction:.3f}",
            f"{row.executed_over_zero_skip:.3f}",
        )
    return table


@app.command()
def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            help="CIFAR-10: a folder holding cifar10-jpeg.tar.gz, its unpacked tree, or "
            "cifar-10-batches-py/ (default: $SELACT_DATA, then the cache folder)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = DemoConfig.epochs,
    seed: Annotated[int, typer.Option(help="Seed of init, batch order and augmentation.")] = 0,
    smoke: Annotated[
        bool,
        typer.Option(help="512 training and 256 test images, 1 epoch (ignores --epochs): seconds."),
    ] = False,
    download: Annotated[
        bool, typer.Option(help="Allow a torchvision download into the cache folder.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write the rows and the config to this JSON file.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
) -> None:
    """Train small_cnn on CIFAR-10, then compare SAPI and SAPW at densities 1.0 to 0.25."""
    fields = {"data": None if data is None else str(data), "seed": seed, "download": download}
    if smoke:
        config = DemoConfig.smoke(**fields)
    else:
        config = DemoConfig(epochs=epochs, **fields)
    start = time.perf_counter()
    try:
        result = run_demo(config, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        Console(stderr=True).print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err
    seconds = time.perf_counter() - start
    console = Console()
    console.print(_table(result))
    console.print(
        f"dense top-1 {100 * result.dense_top1:.2f} %, training {result.train_seconds:.0f} s, "
        f"total {seconds:.0f} s"
    )
    if out is not None:
        payload = {**result.to_dict(), "total_seconds": seconds}
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {out}")


# train|finetune|eval|sweep|report, generic over registered tasks (selact.cli_train); a task
# listed in TASK_COMMANDS gets its own train|finetune|eval|sweep through _TaskGroup.
cli_train.register(app)
