"""Benchmark results: the machine they were measured on, and JSON, Markdown and PNG files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch

from selact._files import atomic_write, atomic_write_text
from selact._provenance import commit


def machine() -> str:
    """A short name of this machine for file names: the GPU, or the CPU model, core count and
    widest vector instructions (the CPU kernels' build depends on them, and CPUs of one model
    name differ: "AMD EPYC" has been a machine with AVX-512 and one with AVX2 alone)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        model, flags = _cpu_info()
        vectors = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
        name = f"{model.replace('(R)', '').replace('(TM)', '')} {os.cpu_count()}c {vectors}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (empty where /proc/cpuinfo is not)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def context() -> dict:
    """What every row carries: machine, versions, commit (:func:`selact._provenance.commit`) and
    date."""
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    return {
        "machine": machine(),
        "versions": versions,
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }


COLUMNS = (
    "op",
    "shape",
    "dtype",
    "granularity",
    "density",
    "backend",
    "batch",
    "threads",
    "median_ms",
    "ratio_to_dense",
    "ratio_to_ideal",
)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path, stem: str) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write_text(out / f"{stem}.json", json.dumps(rows, indent=1) + "\n"),
        atomic_write_text(out / f"{stem}.md", markdown(rows)),
    ]
    paths.append(plot(rows, out / f"{stem}.png"))
    return paths


def plot(rows: list[dict], path: Path) -> Path:
    """Time relative to dense against density, a panel per op and shape; written atomically."""
    return atomic_write(path, lambda tmp: _plot(rows, tmp))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["backend"] != "dense":
            key = (row["op"], row["shape"], row["granularity"], row["dtype"])
            groups.setdefault(key, []).append(row)
    panels = sorted({k[:2] for k in groups})
    cols = min(3, len(panels)) or 1
    rows_n = -(-len(panels) // cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for key, members in groups.items():
            if key[:2] != panel:
                continue
            for backend in sorted({m["backend"] for m in members}):
                points = sorted(
                    (m["density"], m["ratio_to_dense"]) for m in members if m["backend"] == backend
                )
                label = f"{backend} ({key[2]}, {key[3]})"
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal: density x dense")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set(
            title=f"{panel[0]} {panel[1]}", xlabel="density", ylabel="time / dense", xlim=(0, 1.05)
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
