"""The VOC sweep's report: summary numbers, a Markdown table, mAP-against-MACs plot and a picture
of detections (dense and selective side by side). Used by :mod:`selact.experiments.voc_sweep`."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selact._files import atomic_write, atomic_write_text

__all__ = ["summarize", "markdown", "write", "TOLERANCE"]

log = logging.getLogger(__name__)

#: "Within 0.5 pt of dense": mAP@0.5 (a fraction) at least dense - 0.005.
TOLERANCE = 0.005


def _is_dense(row: dict[str, Any]) -> bool:
    return row["strategy"] == "dense" and row["layers"] == "none"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Dense mAP, the cheapest selective row within :data:`TOLERANCE`, and SAPW against SAPI."""
    dense = next(r for r in rows if _is_dense(r) and r["finetune_epochs"] == 0)
    zero_skip = next((r for r in rows if r["strategy"] == "zero_skip"), None)
    selective = [r for r in rows if r["strategy"] in ("sapi", "sapw")]
    within = [r for r in selective if r["map50"] >= dense["map50"] - TOLERANCE]
    best = min(within, key=lambda r: r["executed_mac_fraction"], default=None)
    summary: dict[str, Any] = {
        "dense_map50": dense["map50"],
        "zero_skip_mac_fraction": zero_skip["zero_skip_mac_fraction"] if zero_skip else None,
        "zero_skip_map50": zero_skip["map50"] if zero_skip else None,
        "tolerance": TOLERANCE,
        "best_within_tolerance": None,
    }
    if best is not None:
        summary["best_within_tolerance"] = {
            "key": best["key"],
            "map50": best["map50"],
            "executed_mac_fraction": best["executed_mac_fraction"],
            "executed_over_zero_skip": best["executed_over_zero_skip"],
            # against the zero-skipping baseline row, whose stem and predictors stay dense
            "executed_over_zero_skip_row": best["executed_mac_fraction"]
            / zero_skip["executed_mac_fraction"]
            if zero_skip
            else None,
            "meets_one_third": best["executed_mac_fraction"] <= 1 / 3,
            "meets_two_thirds_of_zero_skip": best["executed_over_zero_skip"] <= 2 / 3,
        }
    pairs = []
    for r in rows:
        if r["strategy"] != "sapi":
            continue
        twin = next(
            (
                s
                for s in rows
                if s["strategy"] == "sapw"
                and (s["layers"], s["target_density"], s["finetune_epochs"], s["granularity"])
                == (r["layers"], r["target_density"], r["finetune_epochs"], r["granularity"])
            ),
            None,
        )
        if twin is not None:
            pairs.append(
                {
                    "layers": r["layers"],
                    "target_density": r["target_density"],
                    "finetune_epochs": r["finetune_epochs"],
                    "sapi_map50": r["map50"],
                    "sapw_map50": twin["map50"],
                    "sapi_mac_fraction": r["executed_mac_fraction"],
                    "sapw_mac_fraction": twin["executed_mac_fraction"],
                    "sapw_minus_sapi_pt": 100 * (twin["map50"] - r["map50"]),
                }
            )
    summary["sapw_vs_sapi"] = pairs
    return summary


def markdown(document: dict[str, Any], images: dict[str, str]) -> str:
    """The table of rows and the summary, with links to the pictures."""
    rows, summary, dense = document["rows"], document["summary"], document["dense"]
    first = rows[0]
    lines = [
        f"# VOC detection sweep, `det`, scale `{document['scale']}`",
        "",
        f"- Data: {first['data']}. mAP@0.5 is VOC all-point AP on **val**, difficult boxes "
        "ignored.",
        f"- Command: `{first['command']}`",
        f"- Hardware: {first['hardware']}; commit `{first['commit']}`; date {first['date']}.",
        f"- Dense training: {dense['epochs']} epochs in {dense['train_seconds'] / 60:.1f} min; "
        f"checkpoint sha256 `{dense['checkpoint_sha256'][:16]}…`; seed {first['seed']}.",
        "- MACs: fractions of the whole model's dense MACs. Executed MACs count kept nonzero "
        "inputs; the stem and the head's predictors stay dense (executed = dense) in every row, "
        "while zero-skipping MACs (zs) skip the zero inputs of every layer, those included, so "
        "the zero-skipping row's exec/zs is above 1.",
        "",
        "| strategy | layers | density | FT epochs | exec/dense | zs/dense | exec/zs "
        "| mAP@0.5 % | Δ pt | 11-pt % | COCO mAP % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        coco = f"{100 * r['coco_map']:.2f}" if r.get("coco_map") is not None else "–"
        lines.append(
            f"| {r['strategy']} | {r['layers']} | {r['target_density']:g} | "
            f"{r['finetune_epochs']} | {r['executed_mac_fraction']:.3f} | "
            f"{r['zero_skip_mac_fraction']:.3f} | {r['executed_over_zero_skip']:.3f} | "
            f"{100 * r['map50']:.2f} | {100 * (r['map50'] - summary['dense_map50']):+.2f} | "
            f"{100 * r['map50_07']:.2f} | {coco} |"
        )
    lines += ["", "## Summary", ""]
    best = summary["best_within_tolerance"]
    if best:
        lines.append(
            f"- Cheapest selective detector within {100 * summary['tolerance']:.1f} pt of dense: "
            f"`{best['key']}`, mAP@0.5 {100 * best['map50']:.2f} % at "
            f"{best['executed_mac_fraction']:.3f} of dense MACs "
            f"({best['executed_over_zero_skip']:.3f} of the zero-skipping MACs of every layer, "
            f"{best['executed_over_zero_skip_row'] or float('nan'):.3f} of the zero-skipping "
            "row's executed MACs): target 1/3 "
            f"{'met' if best['meets_one_third'] else 'not met'}, 2/3 of zero-skipping "
            f"{'met' if best['meets_two_thirds_of_zero_skip'] else 'not met'}."
        )
    else:
        lines.append(
            f"- No selective row stays within {100 * summary['tolerance']:.1f} pt of dense."
        )
    lines += [
        "",
        "SAPW minus SAPI (mAP@0.5 pt) at equal density:",
        "",
        "| layers | density | FT epochs | SAPI % | SAPW % | SAPI MACs | SAPW MACs | SAPW − SAPI |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in summary["sapw_vs_sapi"]:
        lines.append(
            f"| {p['layers']} | {p['target_density']:g} | {p['finetune_epochs']} | "
            f"{100 * p['sapi_map50']:.2f} | {100 * p['sapw_map50']:.2f} | "
            f"{p['sapi_mac_fraction']:.3f} | {p['sapw_mac_fraction']:.3f} | "
            f"{p['sapw_minus_sapi_pt']:+.2f} |"
        )
    lines.append("")
    for title, name in images.items():
        lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if _is_dense(r) and r["finetune_epochs"] == 0)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["strategy"] in ("sapi", "sapw", "random"):
            ft = f", FT {r['finetune_epochs']}" if r["finetune_epochs"] else ""
            series.setdefault(f"{r['strategy']} {r['layers']}{ft}", []).append(r)
    for label, members in sorted(series.items()):
        members = sorted(members, key=lambda r: r["executed_mac_fraction"])
        x = [r["executed_mac_fraction"] for r in members]
        y = [100 * r["map50"] for r in members]
        style = "--" if "random" in label else "-"
        marker = "*" if "FT" in label else "o"
        ax.plot(x, y, style, marker=marker, label=label, markersize=8 if marker == "*" else 4)
    for r in rows:
        if r["strategy"] in ("dense", "zero_skip"):
            ft = f" FT {r['finetune_epochs']}" if r["finetune_epochs"] else ""
            ax.scatter(r["executed_mac_fraction"], 100 * r["map50"], marker="s", s=40, zorder=3)
            ax.annotate(
                f"{r['strategy']}{ft}",
                (r["executed_mac_fraction"], 100 * r["map50"]),
                textcoords="offset points",
                xytext=(-10, 6),
                fontsize=7,
            )
    ax.axhline(100 * (dense["map50"] - TOLERANCE), color="grey", lw=0.8, ls=":")
    others = [100 * r["map50"] for r in rows if r["strategy"] != "random"]
    randoms = [r for r in rows if r["strategy"] == "random"]
    floor = min(others) - 1.5
    if randoms and min(100 * r["map50"] for r in randoms) < floor:  # far below: note, not plot
        ax.set_ylim(bottom=floor, top=max(others) + 0.8)
        best = max(randoms, key=lambda r: r["map50"])
        ax.text(
            0.02,
            0.02,
            f"random masks (all layers): mAP@0.5 at most {100 * best['map50']:.2f} %, "
            "below the axis",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.axvline(1 / 3, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("executed / dense MACs")
    ax.set_ylabel("mAP@0.5 on val (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


@torch.no_grad()
def _detections(
    model: nn.Module, task, indices: list[int], threshold: float, max_boxes: int = 5
) -> list:
    from torchvision.utils import draw_bounding_boxes

    from selact.data.voc import CLASSES, decode_image, eval_transform, letterbox_factors

    dataset = task.datasets["val"]
    model.eval()
    pictures = []
    transform = eval_transform(task.image_size)
    for i in indices:
        record = dataset.records[i]
        image = decode_image(record)
        from torchvision import tv_tensors

        x = transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        det = model(x[None].to(task.device))[0]
        keep = (det["scores"] >= threshold).nonzero().squeeze(1)[:max_boxes]  # sorted by score
        _, _, sy, sx = letterbox_factors(record.height, record.width, task.image_size)
        boxes = det["boxes"][keep].float().cpu() / torch.tensor([sx, sy, sx, sy])
        labels = [
            f"{CLASSES[int(c)]} {float(s):.2f}"
            for c, s in zip(det["labels"][keep], det["scores"][keep], strict=True)
        ]
        pictures.append(draw_bounding_boxes(image, boxes, labels, colors="yellow", width=2))
    return pictures


def _picture(task, models: list[tuple[str, nn.Module]], path: Path, threshold=0.3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_val = len(task.datasets["val"])
    records = task.datasets["val"].records
    # the first images with at least two objects: more to see
    indices = [i for i in range(n_val) if len(records[i].labels) >= 2][:4] or [0]
    grids = [(title, _detections(m, task, indices, threshold)) for title, m in models]
    fig, axes = plt.subplots(
        len(grids), len(indices), figsize=(3 * len(indices), 3 * len(grids)), squeeze=False
    )
    for r, (title, pictures) in enumerate(grids):
        for c, picture in enumerate(pictures):
            ax = axes[r][c]
            ax.imshow(picture.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle(f"val detections: the 5 highest scores >= {threshold}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=72, format="png"))
    plt.close(fig)


def _selective_for_picture(document, dense: nn.Module, config) -> tuple[str, nn.Module] | None:
    from selact.experiments.voc_sweep import Row, row_model
    from selact.train import load_model

    rows = document["rows"]
    best = document["summary"]["best_within_tolerance"]
    candidates = [r for r in rows if best and r["key"] == best["key"]] or sorted(
        (r for r in rows if r["strategy"] == "sapi" and r["layers"] == "all"),
        key=lambda r: (-r["finetune_epochs"], r["target_density"]),
    )
    if not candidates:
        return None
    r = candidates[0]
    row = Row(
        r["strategy"], r["layers"], r["granularity"], r["target_density"], r["finetune_epochs"]
    )
    if row.finetune_epochs:
        checkpoint = config.run_path / f"ft-{row.key}" / "model.safetensors"
        model, _ = load_model(copy.deepcopy(dense), checkpoint)
    else:
        model = row_model(dense, row)
    title = (
        f"{r['strategy']} {r['layers']} d={r['target_density']:g} FT {r['finetune_epochs']}\n"
        f"mAP {100 * r['map50']:.1f} %, {r['executed_mac_fraction']:.2f} MACs"
    )
    return title, model.to(next(dense.parameters()).device)


def write(document: dict[str, Any], out: Path, task, dense: nn.Module, config) -> None:
    """Merge the rows into ``out`` (JSON, rows of other scales kept) and write the table and
    pictures beside it."""
    scale = document["scale"]
    merged: dict[str, Any] = {"experiments": {}}
    if out.is_file():
        merged = json.loads(out.read_text())
    merged.setdefault("experiments", {})[scale] = {k: v for k, v in document.items() if k != "rows"}
    merged["rows"] = [r for r in merged.get("rows", []) if r.get("scale") != scale]
    merged["rows"] += document["rows"]
    atomic_write_text(out, json.dumps(merged, indent=1, default=str) + "\n")
    stem = out.with_suffix("").name + f"-{scale}"
    plot = out.parent / f"{stem}-map-vs-macs.png"
    _plot(document["rows"], plot, f"det on VOC val ({scale} scale): mAP@0.5 against MACs")
    images = {"mAP against executed MACs": plot.name}
    picked = _selective_for_picture(document, dense, config)
    if picked is not None:
        d = document["rows"][0]
        dense_title = f"dense\nmAP {100 * d['map50']:.1f} %, 1.00 MACs"
        picture = out.parent / f"{stem}-detections.png"
        _picture(task, [(dense_title, dense), picked], picture)
        images["detections, dense and selective"] = picture.name
    atomic_write_text(out.parent / f"{stem}.md", markdown(document, images))
    log.info("wrote %s and its table and pictures", out)
