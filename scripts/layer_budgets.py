"""Where each AMU strategy spends a global MAC budget: the greedy budget search of the sweep
(same calibration images, targets and settings as `selact sweep`), per layer, for SAPI and SAPW
on one dense CIFAR-10 checkpoint, with the val top-1 of each allocation (no fine-tuning) and the
spread of the norms of the weights each input feeds (max / min over the inputs: where it is wide,
SAPW's scores differ most from SAPI's).
Writes a JSON list of rows (one per strategy and layer) and prints a Markdown table.

Usage (from the repository root):
  python scripts/layer_budgets.py CKPT --model resnet20 --data ../shared/data --target 0.3333 \
      --out results/cifar10/full-h100/resnet20-layer-budgets.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

import selact
from selact._files import atomic_write_text
from selact._provenance import commit
from selact.amu import apply_densities, budget_search, input_norms
from selact.experiments.recipes import recipe
from selact.experiments.sweep import calibration_batches, converted_copy
from selact.models import create_model
from selact.train import TaskOptions, create_task, hardware, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default=None)
    parser.add_argument("--strategies", nargs="+", default=["sapi", "sapw"])
    parser.add_argument("--target", type=float, default=1 / 3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rec = recipe(args.model)
    targets = sorted({*rec.all_targets(), args.target}, reverse=True)
    task = create_task("cifar10", TaskOptions(data=args.data, device="cpu"), **rec.task_args)
    dense, _ = load_model(create_model(args.model, **task.model_kwargs()), args.checkpoint)
    dense.eval()
    calib = calibration_batches(task, rec)
    rows = []
    for strategy in args.strategies:
        model = converted_copy(dense, strategy, "element")
        results = budget_search(
            model, calib, targets, sensitivity=task.sensitivity, mac_step=0.01,
            max_steps=rec.search_steps, refresh=rec.search_refresh,
        )  # fmt: skip
        result = next(r for r in results if abs(r.target - args.target) < 1e-9)
        apply_densities(model, result.densities)
        selact.reset_stats(model)
        with torch.no_grad():
            val = task.evaluate(model, task.loader("val", batch_size=1000, train=False))
        stats = selact.stats(model)
        total = stats.total.dense_macs
        modules = dict(model.named_modules())
        for name, layer in stats.layers.items():
            rows.append(
                {
                    "strategy": strategy,
                    "layer": name,
                    "density": result.densities.get(name),
                    "dense_mac_share": layer.dense_macs / total,
                    "zero_skip_fraction": layer.zero_skip_fraction,
                    "executed_fraction": layer.executed_fraction,
                    "executed_mac_share": layer.executed_macs / total,
                    "weight_norm_spread": _norm_spread(_weight_of(modules, name)),
                    "val_top1": val["top1"],
                    "val_executed_fraction": stats.total.executed_fraction,
                    "target": args.target,
                    "model": args.model,
                    "checkpoint": str(args.checkpoint),
                    "calib_images": rec.calib_images,
                    "hardware": hardware("cpu"),
                    "commit": commit(),
                    "date": datetime.date.today().isoformat(),
                }
            )
        print(f"{strategy}: val top-1 {100 * val['top1']:.2f} % at executed/dense "
              f"{stats.total.executed_fraction:.3f}", flush=True)  # fmt: skip
        # each strategy's rows as soon as they exist: a ViT's search takes most of an hour on 2 cores
        atomic_write_text(Path(args.out), json.dumps(rows, indent=1) + "\n")
    by_layer: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], {})[row["strategy"]] = row
    head = " | ".join(f"{s} density | {s} exec/dense" for s in args.strategies)
    print(f"| layer | share of dense MACs | zero-skip/dense | weight norms max/min | {head} |")
    print("|---|---|---|---|" + "---|---|" * len(args.strategies))
    for name, per in by_layer.items():
        first = next(iter(per.values()))
        cells = " | ".join(
            f"{_fmt(per[s]['density'])} | {per[s]['executed_fraction']:.3f}"
            for s in args.strategies
        )
        print(f"| {name} | {first['dense_mac_share']:.3f} | {first['zero_skip_fraction']:.3f} | "
              f"{_fmt(first['weight_norm_spread'], '–', 1)} | {cells} |")  # fmt: skip


def _weight_of(modules: dict[str, torch.nn.Module], name: str) -> torch.Tensor | None:
    """The weight a selective layer multiplies: its own, or for attention's in-projection (which
    is handed the weight at call time) the parent's ``in_proj_weight``."""
    weight = getattr(modules[name], "weight", None)
    parent, _, child = name.rpartition(".")
    if weight is None and child == "in_proj" and parent in modules:
        weight = getattr(modules[parent], "in_proj_weight", None)
    return weight


def _norm_spread(weight: torch.Tensor | None) -> float | None:
    """Max / min over the inputs of SAPW's weight norms (:func:`selact.amu.input_norms`); None
    for layers without such a weight (attention's products)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        return None
    norms = input_norms(weight, "linear" if weight.dim() == 2 else "conv")
    return float(norms.max() / norms.min().clamp_min(1e-12))


def _fmt(value: float | None, missing: str = "dense", digits: int = 3) -> str:
    return missing if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
