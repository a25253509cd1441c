"""Timing: medians of interleaved runs, wall clock on the CPU, CUDA events on the GPU.

The routes being compared run interleaved, one call of each in turn, so that load from other
processes shifts them alike and their ratios stay meaningful; the order of the turn is shuffled
every round (seeded), so that no route always follows the same one: in a fixed order the route
after dense PyTorch always paid for the weights dense had just streamed through the caches. Each
route cycles through several inputs and masks, as a layer sees new ones every call (a fixed mask
would keep its kept weights in cache and flatter the sparse kernels), and reads its own copy of the
weights: between two calls of one route the others' traffic evicts its data, as the other layers of
a model do. On the GPU the L2 cache is emptied before each timed call, for the same reason, by
*reading* a buffer larger than it: a flush by writing (``buffer.zero_()``, as
``triton.testing.do_bench`` does) leaves the L2 full of dirty lines, whose write-back the timed
call would pay for, dense or sparse alike (a cost of the flush, not of the layer; docs/kernels.md
compares the two on an H100).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

#: Bytes read to empty the GPU's L2 between timed calls (H100/H200 L2: 50-60 MB).
L2_FLUSH_BYTES = 256 << 20


def median_ms(
    routes: dict[str, Sequence[Callable[[], object]]],
    reps: int,
    device: str = "cpu",
    warmup: int = 5,
) -> dict[str, float]:
    """Median milliseconds per call of each route; a route is a list of calls it cycles through."""
    timer = _cuda_timer() if device == "cuda" else _cpu_time
    for calls in routes.values():
        for i in range(warmup):
            calls[i % len(calls)]()
    times: dict[str, list[float]] = {name: [] for name in routes}
    order = list(routes)
    shuffle = random.Random(0).shuffle
    for i in range(reps):
        shuffle(order)
        for name in order:
            times[name].append(timer(routes[name][i % len(routes[name])]))
    return {name: statistics.median(values) for name, values in times.items()}


def _cpu_time(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - start)


def _cuda_timer() -> Callable[[Callable[[], object]], float]:
    flush = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def time_one(call: Callable[[], object]) -> float:
        torch.sum(flush, dim=0, out=total)  # reads 256 MB: the L2 holds clean lines only
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return time_one


def graphed(
    routes: dict[str, Sequence[Callable[[], object]]], eager: frozenset[str] = frozenset()
) -> tuple[dict[str, list[Callable[[], object]]], dict[str, str]]:
    """Each route's calls captured as CUDA graphs, so that timing them measures the GPU's work
    and not Python's launch overhead. Routes named in ``eager`` (they sync, as ``nonzero`` does)
    and routes whose capture fails stay eager. Returns the new routes and, per route,
    ``"cuda_graph"`` or ``"eager"``."""
    out: dict[str, list[Callable[[], object]]] = {}
    methods: dict[str, str] = {}
    for name, calls in routes.items():
        if name in eager:
            out[name], methods[name] = list(calls), "eager"
            continue
        try:
            out[name] = [_capture(call) for call in calls]
            methods[name] = "cuda_graph"
        except RuntimeError:
            torch.cuda.synchronize()
            out[name] = list(calls)
            methods[name] = "eager"
    return out, methods


def _capture(call: Callable[[], object]) -> Callable[[], object]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotuning, caches) outside the capture
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay
