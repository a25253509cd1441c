"""Per-layer statistics: dense, zero-skipping and executed MACs, and the kept density."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

_FIELDS = ("calls", "dense_macs", "zero_skip_macs", "executed_macs", "kept", "inputs")


class Counter:
    """Running sums that never force a device sync: Python ints for counts made on the CPU (a CPU
    tensor's value is at hand; six tensor additions a call cost more than a small layer's
    kernel), 0-dim int64 tensors on the layer's device for the others and under torch.compile."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | int] = {}

    def add(self, device: torch.device, **values: torch.Tensor | int) -> None:
        on_cpu = device.type == "cpu" and not torch.compiler.is_compiling()
        for name in _FIELDS:
            value = values.get(name, 1 if name == "calls" else 0)
            total = self._sums.get(name, 0)
            if on_cpu:
                self._sums[name] = int(total) + int(value)
                continue
            if not isinstance(total, torch.Tensor) or total.device != device:
                total = torch.as_tensor(total, dtype=torch.int64).to(device)
            with torch.no_grad():
                self._sums[name] = total + value

    def reset(self) -> None:
        self._sums.clear()

    def read(self) -> dict[str, int]:
        return {name: int(self._sums[name]) if name in self._sums else 0 for name in _FIELDS}


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Sums over the forward passes counted for one layer (or the whole model)."""

    name: str
    kind: str
    converted: bool
    calls: int
    dense_macs: int
    zero_skip_macs: int
    executed_macs: int
    kept: int
    inputs: int

    @property
    def density(self) -> float:
        """Mean fraction of inputs the mask kept (zeros included)."""
        return self.kept / self.inputs if self.inputs else float("nan")

    @property
    def executed_fraction(self) -> float:
        """Executed / dense MACs: the paper's "calculations"."""
        return self.executed_macs / self.dense_macs if self.dense_macs else float("nan")

    @property
    def zero_skip_fraction(self) -> float:
        """Zero-skipping / dense MACs: what free ReLU sparsity alone saves."""
        return self.zero_skip_macs / self.dense_macs if self.dense_macs else float("nan")

    @property
    def executed_over_zero_skip(self) -> float:
        """Executed / zero-skipping MACs: what the AMU adds beyond free sparsity."""
        return self.executed_macs / self.zero_skip_macs if self.zero_skip_macs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in (
            "density",
            "executed_fraction",
            "zero_skip_fraction",
            "executed_over_zero_skip",
        ):
            data[name] = getattr(self, name)
        return data


@dataclasses.dataclass(frozen=True)
class Stats:
    """Statistics of every counted layer, in module order, and their total."""

    layers: dict[str, LayerStats]
    total: LayerStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers.values()],
            "total": self.total.to_dict(),
        }

    def __str__(self) -> str:
        head = (
            "layer",
            "kind",
            "sel",
            "density",
            "dense MACs",
            "zero-skip",
            "executed",
            "exec/dense",
            "exec/zs",
        )
        rows = [_row(s) for s in (*self.layers.values(), self.total)]
        widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]

        def line(cells):
            return "  ".join(
                str(c).ljust(w) if i < 3 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        rule = "-" * len(line(head))
        body = [line(r) for r in rows]
        return "\n".join([line(head), rule, *body[:-1], rule, body[-1]])


def _row(s: LayerStats) -> tuple[str, ...]:
    return (
        s.name,
        s.kind,
        "yes" if s.converted else "no",
        f"{s.density:.3f}",
        f"{s.dense_macs:,}",
        f"{s.zero_skip_macs:,}",
        f"{s.executed_macs:,}",
        f"{s.executed_fraction:.3f}",
        f"{s.executed_over_zero_skip:.3f}",
    )


def collect(model: nn.Module) -> Stats:
    """The :class:`Stats` of ``model`` (see :func:`selact.stats`)."""
    layers: dict[str, LayerStats] = {}
    for name, module in model.named_modules():
        counted = _counted(module)
        if counted is None:
            continue
        kind, converted, counter = counted
        layers[name] = LayerStats(name=name, kind=kind, converted=converted, **counter.read())
    sums = {f: sum(getattr(s, f) for s in layers.values()) for f in _FIELDS}
    total = LayerStats(
        name="total", kind="", converted=any(s.converted for s in layers.values()), **sums
    )
    return Stats(layers=layers, total=total)


def reset(model: nn.Module) -> None:
    """Zero every counter of ``model`` (see :func:`selact.reset_stats`)."""
    for module in model.modules():
        counted = _counted(module)
        if counted is not None:
            counted[2].reset()


def _counted(module: nn.Module) -> tuple[str, bool, Counter] | None:
    from selact.nn.base import SelectiveModule
    from selact.nn.dense_count import dense_counter

    if isinstance(module, SelectiveModule):
        return module.kind, True, module.counter
    counter = dense_counter(module)
    if counter is not None:
        return _kind_of_dense(module), False, counter
    return None


def _kind_of_dense(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"
