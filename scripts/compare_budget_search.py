"""The plain greedy budget search against its lazy form (``refresh``), on one dense CIFAR-10
checkpoint: time, passes over the calibration batches, calibration distance and val top-1 at
each target. Writes a JSON list of rows and prints a Markdown table.

Usage (from the repository root):
  python scripts/compare_budget_search.py CKPT --model resnet20 --data ../shared/data \
      --calib-images 250 --refresh 1 5 --out results/cifar10/budget-search-refresh.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch

import selact
from selact._files import atomic_write_text
from selact._provenance import commit
from selact.amu import apply_densities, budget_search
from selact.models import create_model
from selact.train import TaskOptions, create_task, hardware, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default=None)
    parser.add_argument("--strategy", default="sapi")
    parser.add_argument("--calib-images", type=int, default=250)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 1 / 3, 0.25, 0.2])
    parser.add_argument("--refresh", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    task = create_task("cifar10", TaskOptions(data=args.data, device="cpu"))
    dense, _ = load_model(create_model(args.model, **task.model_kwargs()), args.checkpoint)
    dense.eval()
    calib = []
    for images, _ in task.loader("val", batch_size=args.calib_images, train=False):
        calib.append(images)
        break
    rows = []
    for refresh in args.refresh:
        model = selact.sparsify(
            copy.deepcopy(dense), strategy=args.strategy, backend="reference", check_finite=False
        )
        start = time.perf_counter()
        results = budget_search(
            model, calib, args.targets, sensitivity=task.sensitivity, mac_step=0.01,
            max_steps=args.max_steps, refresh=refresh,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        for result in results:
            apply_densities(model, result.densities)
            with torch.no_grad():
                val = task.evaluate(model, task.loader("val", batch_size=1000, train=False))
            rows.append(
                {
                    "refresh": refresh,
                    "target": result.target,
                    "calib_executed_fraction": result.executed_fraction,
                    "calib_sensitivity": result.sensitivity,
                    "evaluations": result.evaluations,
                    "search_seconds": seconds,
                    "val_top1": val["top1"],
                    "model": args.model,
                    "strategy": args.strategy,
                    "calib_images": args.calib_images,
                    "checkpoint": str(args.checkpoint),
                    "hardware": hardware("cpu"),
                    "commit": commit(),
                    "date": datetime.date.today().isoformat(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        atomic_write_text(Path(args.out), json.dumps(rows, indent=1) + "\n")
    print("| refresh | target | calib exec | calib KL | passes | search s | val top-1 % |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['refresh']} | {r['target']:.3f} | {r['calib_executed_fraction']:.3f} | "
            f"{r['calib_sensitivity']:.4f} | {r['evaluations']} | {r['search_seconds']:.0f} | "
            f"{100 * r['val_top1']:.2f} |"
        )


if __name__ == "__main__":
    main()
