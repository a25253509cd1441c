"""How fast could a block-granularity convolution be on this CPU? A lower bound, measured.

A ``block`` mask keeps or drops G consecutive channels at each position, so every position keeps
its own channels: neither the channel kernel (one channel set per sample) nor the spatial one
(whole positions) applies. The form measured is the scatter form of the spatial
kernel, per channel block: the inputs of the positions that keep block g, (n_g, G), times that
block's weights viewed as (G, taps · N) (one GEMM, MKL), then each output sums the products that
reach it. Its GEMMs alone do exactly the kept multiply-accumulates, with an inner dimension of G;
this script times them (products preallocated, no sums, no gathering) against the dense
convolution of the same layer. Where the GEMMs alone are not faster than ``density x dense``,
no kernel of this form can meet the target.

    python scripts/block_conv_bound.py --block 16 32 --reps 300 --out results/bench/block-conv-bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from selact._files import atomic_write_text
from selact.bench.report import context
from selact.bench.timing import median_ms

LAYERS = [(64, 32), (256, 8)]  # (channels in = out, size): the 3x3 convolutions


def measure(channels: int, size: int, density: float, block: int, reps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, size, size, generator=g)
    w = torch.randn(channels, channels, 3, 3, generator=g)
    bias = torch.randn(channels, generator=g)
    positions = size * size
    blocks = channels // block
    keep = torch.rand(blocks, positions, generator=g) < density  # block g kept at position p
    rows = x.permute(0, 2, 3, 1).reshape(positions, channels)
    # per block: its kept positions' inputs (n_g, G) and its weights (G, taps * N)
    inputs = [rows[keep[b]][:, b * block : (b + 1) * block].contiguous() for b in range(blocks)]
    weights = [
        w[:, b * block : (b + 1) * block].permute(1, 2, 3, 0).reshape(block, -1).contiguous()
        for b in range(blocks)
    ]
    products = [torch.empty(len(a), weights[0].shape[1]) for a in inputs]

    def gemms():
        for a, wt, out in zip(inputs, weights, products, strict=True):
            torch.mm(a, wt, out=out)

    # interleaved, as `selact bench` times its routes (one mask here, the data in cache: a bound)
    ms = median_ms({"dense": [lambda: F.conv2d(x, w, bias, padding=1)], "gemms": [gemms]}, reps)
    dense_ms, gemm_ms = ms["dense"], ms["gemms"]
    return {
        "layer": f"{channels}->{channels} 3x3 @ {size}x{size}",
        "block": block,
        "density": density,
        "kept_fraction": round(keep.float().mean().item(), 4),
        "dense_ms": round(dense_ms, 4),
        "block_gemms_ms": round(gemm_ms, 4),
        "gemms_to_dense": round(gemm_ms / dense_ms, 3),
        "target_to_dense": round(1.25 * density, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, nargs="+", default=[16], help="channels per block (G)")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows here (JSON), atomically")
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for block in args.block:
            for c, s in LAYERS:
                for d in (0.5, 0.25):
                    rows.append(
                        {"threads": threads, **measure(c, s, d, block, args.reps, args.seed)}
                    )
                    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        command = "python " + " ".join(sys.argv)
        result = {"command": command, "seed": args.seed, **context()}
        atomic_write_text(args.out, json.dumps({**result, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
