"""``selact bench kernels`` and ``selact bench model``: tables on stdout, files in results/bench."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import selact
from selact.bench import kernels, models, report

app = typer.Typer(
    help="Benchmarks: dense against selective, as ratios measured in one run.", no_args_is_help=True
)
RESULTS = Path("results/bench")

Quick = Annotated[
    bool, typer.Option(help="Tiny shapes and few runs, for tests; never writes to results/.")
]
Out = Annotated[
    Path | None,
    typer.Option(
        help="Folder for <machine>-<kind>.json/.md/.png (default results/bench; none with --quick)."
    ),
]
Reps = Annotated[
    int | None, typer.Option(min=3, help="Timed calls per route (default 200, 10 with --quick).")
]


@app.command("kernels")
def kernels_command(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    op: Annotated[list[str] | None, typer.Option(help="Only these ops (repeatable).")] = None,
    granularity: Annotated[
        list[str] | None, typer.Option(help="Only these mask granularities (repeatable).")
    ] = None,
    quick: Quick = False,
    reps: Reps = None,
    out: Out = None,
) -> None:
    """Each MGEMM op: dense PyTorch, every backend that serves it, and the naive routes."""
    cases = (kernels.gpu_cases if device == "cuda" else kernels.cpu_cases)(quick)
    cases = [case for case in cases if not op or case.op in op]
    cases = [case for case in cases if not granularity or case.granularity in granularity]
    rows = list(kernels.run(cases, device, reps or (10 if quick else 200)))
    _finish(rows, "kernels", quick, out)


@app.command("model")
def model_command(
    name: Annotated[list[str] | None, typer.Option("--model", help="Models (repeatable).")] = None,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable).")] = None,
    threads: Annotated[list[int] | None, typer.Option(help="Thread counts (repeatable).")] = None,
    density: Annotated[float, typer.Option(help="Density of the selective copy.")] = 0.35,
    linear_granularity: Annotated[
        str,
        typer.Option(
            help="Granularity of the Linear layers' masks: element (per row, or per token) or "
            "channel (per sample: one feature mask for all of a sample's tokens)."
        ),
    ] = "element",
    strategy: Annotated[
        str, typer.Option(help="AMU strategy of the selective copy: sapi or sapw.")
    ] = "sapi",
    conv_granularity: Annotated[
        str,
        typer.Option(
            help="Granularity of the convolutions' masks: channel (per sample), element "
            "(single inputs, the granularity of the fine-tuned CIFAR-10 frontiers) or spatial."
        ),
    ] = "channel",
    densities: Annotated[
        Path | None,
        typer.Option(
            help="Per-layer densities instead of --density: a finetune --json result (its "
            "searched densities) or a {layer: density} JSON; one model."
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time both models through torch.compile (Inductor, frozen weights).",
        ),
    ] = False,
    counting: Annotated[
        bool,
        typer.Option(
            "--counting",
            help="Also time the selective copy with counting and finiteness checks on "
            "(SelectiveConfig's defaults; route 'selective, counting').",
        ),
    ] = False,
    quick: Quick = False,
    reps: Reps = None,
    out: Out = None,
) -> None:
    """Latency of resnet20, vgg16 and vit, dense and selective at the same weights (CPU)."""
    names = name or (["small_cnn"] if quick else ["resnet20", "vgg16", "vit"])
    batches = batch or ([1] if quick else [1, 32])
    counts = threads or ([1] if quick else [1, 2])
    reps = reps or (10 if quick else 100)
    layers = None
    if densities is not None:
        if len(names) != 1:
            raise typer.BadParameter("--densities names the layers of one --model")
        try:
            layers = selact.amu.read_densities(densities)["densities"]
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error
    rows = list(
        models.run(
            names,
            batches,
            counts,
            density,
            reps,
            linear_granularity=linear_granularity,
            strategy=strategy,
            conv_granularity=conv_granularity,
            densities=layers,
            compile=compile,
            counting=counting,
        )  # fmt: skip
    )
    if densities is not None:
        rows = [{**row, "densities_from": str(densities)} for row in rows]
    _finish(rows, "model", quick, out)


@app.command("plot")
def plot_command(
    json_file: Annotated[Path, typer.Argument(help="A JSON file written by selact bench.")],
) -> None:
    """Redraw the PNG beside a benchmark's JSON (same name, .png)."""
    import json

    rows = json.loads(json_file.read_text())
    path = report.plot(rows, json_file.with_suffix(".png"))
    Console().print(f"wrote {path}")


def _finish(rows: list[dict], kind: str, quick: bool, out: Path | None) -> None:
    context = report.context()
    rows = [{**row, **context} for row in rows]
    console = Console(width=150)
    table = Table(title=f"selact bench {kind} on {context['machine']}")
    for column in (
        "op",
        "shape",
        "dtype",
        "granularity",
        "density",
        "backend",
        "median ms",
        "/ dense",
        "/ ideal",
    ):
        table.add_column(
            column, justify="left" if column in ("op", "shape", "backend") else "right"
        )
    for row in rows:
        table.add_row(
            row["op"],
            row["shape"],
            row["dtype"],
            row["granularity"],
            f"{row['density']:.2f}",
            row["backend"],
            f"{row['median_ms']:.4f}",
            f"{row['ratio_to_dense']:.2f}",
            f"{row['ratio_to_ideal']:.2f}",
        )
    console.print(table)
    if quick and out is None:
        return
    folder = out or RESULTS
    if quick and RESULTS.resolve() in (folder.resolve(), *folder.resolve().parents):
        raise typer.BadParameter("--quick results never go to results/", param_hint="--out")
    for path in report.write(rows, folder, f"{context['machine']}-{kind}"):
        console.print(f"wrote {path}")
