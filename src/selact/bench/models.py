"""Model benchmarks: latency of a dense model and of its selective copy at the same weights.

The selective copy uses SAPI (or SAPW) with channel masks on the convolutions (what the ``cpu`` backend's
fused route turns into time; or ``element`` masks, the granularity whose accuracy holds at lower
densities, served by the element kernel) and element masks on Linear layers (or per-sample
``channel`` masks, which the ``cpu`` backend runs as one GEMM per sample on token sequences), top-k
budget, one density everywhere or per-layer densities (a budget search's), counting and finiteness
checks off; its time includes the AMU's own work (scores, top-k, masks). Latency is the median of
interleaved calls under ``torch.inference_mode``. With ``compile``, both models also run
through ``torch.compile`` (Inductor, weights frozen into constants: ``freezing``, as for
deployment; compiled afresh for each batch size and thread count), their ratio taken to the
compiled dense model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

import selact
from selact.bench.timing import median_ms
from selact.models import create_model

log = logging.getLogger(__name__)

INPUTS = {
    "resnet20": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "vit": (3, 32, 32),
    "small_cnn": (3, 32, 32),
}


def selective_copy(
    model: nn.Module,
    density: float,
    counting: bool = False,
    linear_granularity: str = "element",
    strategy: str = "sapi",
    conv_granularity: str = "channel",
    densities: dict[str, float] | None = None,
) -> nn.Module:
    """``strategy`` at ``density`` (or per layer, ``densities``): ``conv_granularity`` masks on
    convolutions, ``linear_granularity`` masks on Linear layers."""
    linears = {
        n: {"granularity": linear_granularity}
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    selective = selact.sparsify(
        copy.deepcopy(model),
        strategy=strategy,
        density=density,
        granularity=conv_granularity,
        overrides=linears,
        counting=counting,
        check_finite=counting,
    )
    return selact.amu.apply_densities(selective, densities) if densities else selective


def run(
    names: list[str],
    batches: list[int],
    threads: list[int],
    density: float,
    reps: int,
    *,
    linear_granularity: str = "element",
    strategy: str = "sapi",
    conv_granularity: str = "channel",
    densities: dict[str, float] | None = None,
    seed: int = 0,
    compile: bool = False,
    counting: bool = False,
) -> Iterator[dict]:
    """One row per (model, batch, threads, route) with route ``dense`` or ``selective`` (and
    ``dense, compiled`` and ``selective, compiled`` with ``compile``; ``selective, counting``,
    the copy with counting and finiteness checks on, with ``counting``); the selective rows'
    granularity reads the convolutions' ``/`` the Linear layers' one. With per-layer
    ``densities`` the rows' density is the executed MAC fraction, their ideal time that fraction
    of dense."""
    initial_threads = torch.get_num_threads()
    try:
        options = {
            "linear_granularity": linear_granularity,
            "strategy": strategy,
            "conv_granularity": conv_granularity,
            "densities": densities,
        }
        yield from _run(names, batches, threads, density, reps, options, seed, compile, counting)
    finally:
        torch.set_num_threads(initial_threads)


def _compiled(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module:
    """``model`` through torch.compile with frozen weights, compiled now (on ``inputs``)."""
    compiled = torch.compile(model, dynamic=False)
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        for x in inputs:
            compiled(x)
    return compiled


def _run(names, batches, threads, density, reps, options, seed, compile, counting):
    for name in names:
        torch.manual_seed(seed)
        dense = create_model(name, num_classes=10).eval()
        selective = selective_copy(dense, density, **options)
        counted = selective_copy(dense, density, True, **options)
        for batch in batches:
            inputs = [torch.randn(batch, *INPUTS[name]) for _ in range(4)]
            with torch.inference_mode():
                counted(inputs[0])
            executed = selact.stats(counted).total.executed_fraction
            selact.reset_stats(counted)
            for count in threads:
                torch.set_num_threads(count)
                models = {"dense": dense, "selective": selective}
                if counting:
                    models["selective, counting"] = counted
                if compile:  # afresh: Inductor's code is fixed to the thread count
                    torch._dynamo.reset()
                    models["dense, compiled"] = _compiled(dense, inputs)
                    models["selective, compiled"] = _compiled(selective, inputs)
                with torch.inference_mode():
                    times = median_ms(
                        {r: [lambda x=x, m=m: m(x) for x in inputs] for r, m in models.items()},
                        reps,
                    )
                share = executed if options["densities"] else density
                for route, ms in times.items():
                    baseline = times["dense, compiled" if "compiled" in route else "dense"]
                    yield {
                        "op": name,
                        "shape": f"{batch}x{'x'.join(map(str, INPUTS[name]))}",
                        "dtype": "float32",
                        "granularity": "-"
                        if route.startswith("dense")
                        else f"{options['conv_granularity']}/{options['linear_granularity']}",
                        "strategy": "-" if route.startswith("dense") else options["strategy"],
                        "density": 1.0 if route.startswith("dense") else share,
                        "backend": route,
                        "batch": batch,
                        "threads": count,
                        "median_ms": ms,
                        "ratio_to_dense": ms / baseline,
                        "ratio_to_ideal": ms / (share * baseline),
                        "executed_mac_fraction": 1.0 if route.startswith("dense") else executed,
                    }
