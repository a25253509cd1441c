"""Where a CPU selective layer's time goes, warm (in a loop, caches hot): the public MGEMM op,
the CPU backend's function, its kernel called directly and through PyTorch's dispatcher; cold
(right after another layer): the pieces of a call that does almost no arithmetic; the fused
Linear route on the ViT's layer shapes against dense; the convolution kernel's MAC rate; the
AMU's top-k against torch.topk, alone and in a mask-aware training step. Cold calls of real
layer sizes are the ``cpu`` / ``cpu_kernel`` pair of ``selact bench kernels``. Writes a JSON list
of rows and prints a Markdown table.

Usage (from the repository root, machine otherwise idle):
  python scripts/cpu_call_costs.py --out results/bench/cpu-call-costs.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import timeit

import torch
import torch.nn.functional as F

import selact
from selact import amu, mgemm
from selact._files import atomic_write_text
from selact.bench.report import context
from selact.mgemm import cpu


def _us(call, number: int = 2000, repeat: int = 7) -> float:
    """Best of ``repeat`` means of ``number`` calls, in microseconds."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def _kept(n: int, keep: int, *shape: int) -> torch.Tensor:
    """A bool mask of ``n`` entries, the first ``keep`` kept, shaped ``shape``."""
    return (torch.arange(n) < keep).reshape(shape)


def call_layers() -> list[dict]:
    """One call of a 16x16 linear layer and of a 256x8x8 convolution keeping 2 channels: little
    arithmetic, so the times are the calls' own costs."""
    x, w, b = torch.randn(1, 16), torch.randn(16, 16), torch.randn(16)
    m = _kept(16, 8, 1, 16)
    linear = {
        "public op, automatic backend": lambda: mgemm.linear(x, w, b, in_mask=m, count=False),
        "public op, backend='cpu'": lambda: mgemm.linear(
            x, w, b, in_mask=m, count=False, backend="cpu"
        ),
        "cpu backend function": lambda: cpu.linear(x, w, b, in_mask=m, count=False),
        "kernel (pybind)": lambda: cpu.KERNELS["linear"](x, m, w, b, False),
        "kernel (torch op)": lambda: torch.ops.selact_cpu.sparse_linear(x, m, w, b, False),
    }
    xc, wc, bc = torch.randn(1, 256, 8, 8), torch.randn(256, 256, 3, 3), torch.randn(256)
    mc, geometry = _kept(256, 2, 1, 256, 1, 1), cpu.conv_geometry(1, 1, 1)
    conv = {
        "public op, backend='cpu'": lambda: mgemm.conv2d(
            xc, wc, bc, 1, 1, in_mask=mc, count=False, backend="cpu"
        ),
        "cpu backend function": lambda: cpu.conv2d(xc, wc, bc, 1, 1, in_mask=mc, count=False),
        "kernel (pybind)": lambda: cpu.KERNELS["conv2d"](xc, mc, 0, None, wc, bc, *geometry, False),
        "kernel (torch op)": lambda: torch.ops.selact_cpu.channel_conv(
            xc, mc, 0, None, wc, bc, *geometry, False
        ),
    }
    rows = [{"case": "linear 1x16 -> 16", "route": k, "us": _us(f)} for k, f in linear.items()]
    rows += [{"case": "conv 1x256x8x8, 2 kept", "route": k, "us": _us(f)} for k, f in conv.items()]
    return rows


def cold_calls(reps: int = 400) -> list[dict]:
    """Calls of a 768 -> 3072 layer keeping one input (so nearly all of it is the call's own
    cost) and their pieces, each right after a dense 768 -> 3072 layer on other weights has
    evicted the caches, as in a model: medians of ``reps`` calls, the pieces in shuffled turns."""
    k, n = 768, 3072
    w, b = torch.randn(n, k), torch.randn(n)
    evict = [torch.randn(n, k) for _ in range(3)]
    xs = [torch.randn(1, k) for _ in range(8)]
    masks = [_kept(k, 1, 1, k)[:, torch.randperm(k)] for _ in range(8)]
    mgemm.linear(xs[0], w, b, in_mask=masks[0], count=False, backend="cpu")  # planned, packed
    planned, kernel = cpu.PLANNED["linear"], cpu.KERNELS["linear"]
    pieces = {
        "public op (planned call)": lambda i: mgemm.linear(
            xs[i], w, b, in_mask=masks[i], count=False, backend="cpu"
        ),
        "planned call, its C++ alone": lambda i: planned(xs[i], w, b, masks[i], None, False, "cpu"),
        "kernel (pybind)": lambda i: kernel(xs[i], masks[i], w, b, False),
        "a signature not planned (the lookup alone)": lambda i: planned(
            xs[i], w, b, masks[i], None, False, "reference"
        ),
        "torch.compiler.is_compiling()": lambda i: torch.compiler.is_compiling(),
        "torch.compiler.is_dynamo_compiling()": lambda i: torch.compiler.is_dynamo_compiling(),
        "torch.empty(3072)": lambda i: torch.empty(n),
        "an empty Python call": lambda i: None,
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    order, shuffle = list(pieces), random.Random(0).shuffle
    for r in range(reps):
        shuffle(order)
        for name in order:
            F.linear(xs[r % 8], evict[r % 3], b)
            start = time.perf_counter()
            pieces[name](r % 8)
            times[name].append(1e6 * (time.perf_counter() - start))
    return [{"case": "linear 1x768 -> 3072, 1 kept, cold", "route": name,
             "us": statistics.median(values)} for name, values in times.items()]  # fmt: skip


def vit_layers(density: float = 0.35) -> list[dict]:
    """The ViT's Linear layers (65 tokens) through the fused route, against dense."""
    rows = []
    for k, n in ((192, 576), (192, 192), (192, 384), (384, 192)):
        x, w, b = torch.randn(65, k).relu(), torch.randn(n, k), torch.randn(n)
        keep = amu.keep_count(density, k)
        dense = _us(lambda: F.linear(x, w, b), 300)  # noqa: B023 (called at once)
        fused = _us(lambda: cpu.select_linear(x, w, b, groups=1, keep=keep, count=False), 300)  # noqa: B023
        rows.append({"case": f"65x{k} -> {n}", "route": "select_linear / dense", "us": fused,
                     "dense_us": dense, "ratio_to_dense": fused / dense})  # fmt: skip
    return rows


def conv_rates() -> list[dict]:
    """The channel-masked convolution kernel's multiply-accumulates per second."""
    rows = []
    for c, h in ((64, 32), (256, 8)):
        x, w, b = torch.randn(1, c, h, h), torch.randn(c, c, 3, 3), torch.randn(c)
        geometry = cpu.conv_geometry(1, 1, 1)
        for density in (0.25, 0.5, 1.0):
            m = _kept(c, int(c * density), 1, c, 1, 1)
            us = _us(lambda: cpu.KERNELS["conv2d"](x, m, 0, None, w, b, *geometry, False), 300)  # noqa: B023
            macs = c * c * 9 * h * h * density
            rows.append({"case": f"conv 1x{c}x{h}x{h} k3, density {density}", "route": "kernel",
                         "us": us, "gmac_per_s": macs / us / 1e3})  # fmt: skip
    return rows


def top_k() -> list[dict]:
    """The AMU's top-k masks on the CPU: ``torch.topk`` against the compiled radix select."""
    rows = []
    for shape, density in (((65, 192), 0.35), ((65, 384), 0.35), ((4096, 64), 0.35),
                           ((128, 4096), 0.35), ((128, 16384), 0.35)):  # fmt: skip
        scores, k = torch.rand(shape), amu.keep_count(density, shape[1])
        torch_us = _us(lambda: scores.topk(k, -1, sorted=False), 20)  # noqa: B023
        ours = _us(lambda: cpu.topk_mask(scores, k), 20)  # noqa: B023
        rows.append({"case": f"top-k of {shape[0]}x{shape[1]} scores", "route": "cpu.topk_mask",
                     "us": ours, "dense_us": torch_us, "ratio_to_dense": ours / torch_us})  # fmt: skip
    return rows


def training_step() -> list[dict]:
    """One mask-aware training step of ResNet-20 (SAPI, element masks, density 0.35, batch 128)
    with the AMU's top-k through torch.topk and through the radix select."""
    from selact.amu import select
    from selact.models import create_model

    def step_ms(fast: bool) -> float:
        torch.manual_seed(0)
        model = selact.sparsify(
            create_model("resnet20", num_classes=10), strategy="sapi", density=0.35,
            granularity="element", counting=False, check_finite=False,
        ).train()  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

        def step():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        available = select.cpu.available
        select.cpu.available = available if fast else (lambda: False)
        try:
            step()
            return _us(step, number=3, repeat=3) / 1e3
        finally:
            select.cpu.available = available

    slow, fast = step_ms(False), step_ms(True)
    return [{"case": "ResNet-20 training step, SAPI element, batch 128", "route": "radix top-k",
             "us": fast * 1e3, "dense_us": slow * 1e3, "ratio_to_dense": fast / slow}]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="rows JSON (default: print only)")
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit("the CPU kernels could not be built here")
    info = context()
    parts = (
        *call_layers(), *cold_calls(), *vit_layers(), *conv_rates(), *top_k(), *training_step()
    )  # fmt: skip
    rows = [{**r, **info} for r in parts]
    print(f"{info['machine']}, {torch.get_num_threads()} threads, commit {info['commit']}\n")
    print("| case | route | µs | note |\n|---|---|---|---|")
    for r in rows:
        note = ""
        if "ratio_to_dense" in r:  # against dense, or against torch.topk
            note = f"against {r['dense_us']:.1f} µs, ratio {r['ratio_to_dense']:.2f}"
        elif "gmac_per_s" in r:
            note = f"{r['gmac_per_s']:.0f} GMAC/s"
        print(f"| {r['case']} | {r['route']} | {r['us']:.2f} | {note} |")
    if args.out:
        atomic_write_text(args.out, json.dumps(rows, indent=1) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
