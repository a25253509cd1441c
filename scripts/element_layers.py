"""Where an element-masked model's time goes, layer by layer: for each selective convolution of
the model at its searched per-layer densities (batch 1, one thread, its own input from a forward
pass), the selective layer's call, the fused kernel alone (the AMU's top-k and the product, no
Python around it) and dense PyTorch on the same input (contiguous, as a dense model runs it).
The gap between the layer and its kernel is the layer's Python: checks and the route's choice.
Writes a JSON list of rows and a Markdown table beside it.

Usage (from the repository root, machine otherwise idle):
  python scripts/element_layers.py --model resnet20 \\
    --densities results/bench/element/resnet20-sapi-1of3-densities.json \\
    --out results/bench/element/layers/resnet20.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from selact._files import atomic_write_text
from selact.bench.models import INPUTS, selective_copy
from selact.bench.report import context
from selact.bench.timing import median_ms
from selact.mgemm import cpu
from selact.models import create_model
from selact.nn.layers import SelectiveConv2d


def _layer_times(layer: SelectiveConv2d, x: torch.Tensor, reps: int) -> dict[str, float]:
    """The layer's call, its fused kernel alone and dense PyTorch on ``x``: median microseconds
    of interleaved calls (:func:`selact.bench.timing.median_ms`)."""
    contiguous = x.contiguous()
    keep, geometry, kernel = layer._fused_keep, layer._fused_geometry, cpu.KERNELS["element_conv"]
    weight, bias = layer.weight, layer.bias
    ms = median_ms(
        {
            "layer_us": [lambda: layer(x)],
            "kernel_us": [lambda: kernel(x, None, keep, None, weight, bias, *geometry, False)],
            "dense_us": [lambda: F.conv2d(contiguous, weight, bias, layer.stride, layer.padding)],
        },
        reps,
        warmup=20,
    )
    return {route: 1e3 * value for route, value in ms.items()}


def layer_rows(model_name: str, densities: dict[str, float], reps: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    dense = create_model(model_name, num_classes=10).eval()
    selective = selective_copy(dense, 1.0, conv_granularity="element", densities=densities)
    layers = {n: m for n, m in selective.named_modules() if isinstance(m, SelectiveConv2d)}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, args, n=n: inputs.__setitem__(n, args[0].clone()))
        for n, m in layers.items()
    ]
    with torch.inference_mode():
        selective(torch.randn(1, *INPUTS[model_name]))
    for hook in hooks:
        hook.remove()
    rows = []
    with torch.inference_mode():
        for name, layer in layers.items():
            x = inputs[name]
            if not layer._fused_route(x):
                continue  # density 1 or a layer the fused route does not serve
            times = _layer_times(layer, x, reps)
            rows.append(
                {
                    "model": model_name,
                    "layer": name,
                    "input": "x".join(map(str, x.shape)),
                    "out_channels": layer.out_channels,
                    "stride": layer.stride[0],
                    "density": layer.config.density,
                    **{k: round(v, 1) for k, v in times.items()},
                    "ratio_to_dense": round(times["layer_us"] / times["dense_us"], 3),
                    "threads": torch.get_num_threads(),
                    "seed": seed,
                    **context(),
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = "| layer | input | density | layer µs | kernel µs | dense µs | layer / dense |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['input']} | {r['density']:.3f} | {r['layer_us']} | "
            f"{r['kernel_us']} | {r['dense_us']} | {r['ratio_to_dense']:.2f} |"
        )
    total = {k: sum(r[k] for r in rows) for k in ("layer_us", "kernel_us", "dense_us")}
    lines.append(
        f"| all | | | {total['layer_us']:.0f} | {total['kernel_us']:.0f} | "
        f"{total['dense_us']:.0f} | {total['layer_us'] / total['dense_us']:.2f} |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(INPUTS))
    parser.add_argument("--densities", type=Path, required=True, help="{'densities': {...}} JSON")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="JSON file; .md beside it")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the CPU kernels could not be built: nothing to time")
    data = json.loads(args.densities.read_text())
    densities = data.get("densities", data)
    torch.set_num_threads(1)
    rows = layer_rows(args.model, densities, args.reps, args.seed)
    atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
