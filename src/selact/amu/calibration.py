"""Calibration: turn a target density into a per-layer score threshold (inverse CDF, as TEAL)."""

from __future__ import annotations

import torch

#: Scores kept per layer for the quantile. 2**20 float32 values (4 MiB) put the quantile's
#: sampling error near 1e-3 in density, well under the spread between calibration batches.
MAX_SAMPLES = 1 << 20


class ScoreSample:
    """A uniform random sample (at most ``max_samples``) of the pooled scores a layer has seen."""

    def __init__(self, max_samples: int = MAX_SAMPLES, seed: int = 0) -> None:
        self.max_samples = max_samples
        self._values: list[torch.Tensor] = []
        self._count = 0
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def count(self) -> int:
        """How many scores were observed (before sampling)."""
        return self._count

    def add(self, scores: torch.Tensor) -> None:
        values = scores.detach().flatten().float().cpu()
        self._values.append(values)
        self._count += values.numel()
        if self._count > 2 * self.max_samples:
            self._shrink()

    def _shrink(self) -> None:
        values = torch.cat(self._values)
        pick = torch.randperm(values.numel(), generator=self._generator)[: self.max_samples]
        self._values = [values[pick]]
        self._count = self.max_samples

    def threshold(self, density: float) -> torch.Tensor:
        """The score above which a fraction ``density`` of the sampled scores lies."""
        if not self._values:
            raise RuntimeError("no scores were observed: the layer did not run during calibration")
        if self._count > self.max_samples:
            self._shrink()
        values = torch.cat(self._values)
        return torch.quantile(values, 1.0 - density, interpolation="linear")
