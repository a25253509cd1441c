"""The base of every selective module: its config, threshold buffer, counters and checks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from selact import amu, mgemm
from selact.config import SelectiveConfig
from selact.mgemm import cpu
from selact.mgemm.registry import ENV_VAR
from selact.nn.stats import Counter

#: Strategies whose top-k the CPU kernels compute themselves (the fused routes).
FUSED_STRATEGIES = ("sapi", "sapw")


class Converted:
    """Mixin of modules made by a conversion: keeps the original so it can be restored exactly."""

    #: Names of children that :func:`selact.sparsify` must leave dense.
    dense_children: tuple[str, ...] = ()

    def remember(self, original: nn.Module) -> None:
        """Keep ``original`` (outside the module tree) so :meth:`to_dense` can restore it."""
        self.__dict__["_original"] = original

    def to_dense(self) -> nn.Module:
        """The original module, holding this module's current parameters, buffers and children."""
        original = self.__dict__.get("_original")
        if original is None:
            raise RuntimeError(f"{type(self).__name__} was not made by a conversion: no original")
        for name in original._parameters:
            if name in self._parameters:
                setattr(original, name, self._parameters[name])
        for name in original._buffers:
            if name in self._buffers:
                original._buffers[name] = self._buffers[name]
        for name in original._modules:
            if name in self._modules:
                setattr(original, name, self._modules[name])
        original.train(self.training)
        return original


class SelectiveModule(Converted, nn.Module):
    """One place in a model where the AMU chooses inputs and MGEMM multiplies them.

    Holds the :class:`SelectiveConfig`, the calibrated ``threshold`` (a buffer, so it saves,
    loads and moves with the model; NaN until :func:`selact.calibrate` fits it) and the counters
    that :func:`selact.stats` reads. Subclasses implement ``forward`` with :meth:`input_mask`
    and :meth:`record`, and ``to_dense`` to undo the conversion.
    """

    kind = "linear"

    def __init__(self, config: SelectiveConfig) -> None:
        super().__init__()
        if not isinstance(config, SelectiveConfig):
            raise TypeError(f"config must be a SelectiveConfig, got {type(config).__name__}")
        self.config = config
        self.layer_name = ""
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.counter = Counter()
        self.score_sample: amu.ScoreSample | None = None  # set while calibrating
        self._threshold_checked = False
        self._norms_key: tuple | None = None
        self._norms: torch.Tensor | None = None
        self._fused_for: tuple[SelectiveConfig, int] | None = None
        self._fused_keep = 0  # inputs the fused route keeps per unit; 0: no fused route

    def input_mask(
        self, x: torch.Tensor, weight: torch.Tensor, layout: str, groups: int = 1
    ) -> torch.Tensor | None:
        """Ask the AMU for the mask of ``x`` (``None``: keep everything)."""
        calibrating = self.score_sample is not None
        threshold = None
        if self.config.budget == "threshold":
            if not calibrating:
                threshold = self._fitted_threshold()
            elif not bool(torch.isnan(self.threshold)):  # a later calibration pass
                threshold = self.threshold
        norms = None
        if amu.STRATEGIES[self.config.strategy].uses_weight:
            norms = self._input_norms(weight, layout, groups)
        return amu.mask(
            x,
            weight,
            self.config,
            layout=layout,
            groups=groups,
            threshold=threshold,
            norms=norms,
            observe=self.score_sample.add if calibrating else None,
        )

    @staticmethod
    def autocast_operands(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """The operands cast as autocast casts those of ``F.linear``/``F.conv2d``/``matmul``.

        MGEMM takes operands of one dtype; under ``torch.autocast`` a layer's input is often in
        the autocast dtype while its weight is float32. Outside autocast, unchanged.
        """
        first = next(t for t in tensors if t is not None)
        device = first.device.type
        if not torch.is_autocast_enabled(device):
            return tensors
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)

    def project(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x``'s selected inputs times ``weight`` (N, K), plus ``bias``: a selective linear
        layer's work, also for weights held elsewhere (MultiheadAttention's in-projection)."""
        self.check_input(x, size=weight.shape[1])
        groups = self._fused_linear_groups(x, weight)
        if groups:
            mask, y, executed = self._fused_project(x, weight, bias, groups)
        else:
            mask = self.input_mask(x, weight, "linear")
            x, weight, bias = self.autocast_operands(x, weight, bias)
            y, executed = self.mgemm_call(mgemm.linear, x, weight, bias, mask=mask)
        if self.config.counting:
            with torch.no_grad():
                zero_skip = mgemm.linear_macs(x != 0, None, weight.shape[0])
            dense = mgemm.dense_linear_macs(x.shape, weight.shape[0])
            self.record(x, mask, dense=dense, zero_skip=zero_skip, executed=executed)
        return y

    def fused_keep(self, units: int, granularities: tuple[str, ...]) -> int:
        """How many of ``units`` inputs (features, channels) the fused CPU route keeps per
        sample or row under this layer's config; 0 where the config has no fused route: the
        AMU's top-k of SAPI or SAPW at ``granularities``, density below 1, the ``cpu`` backend
        allowed. Worked out once per config and input size."""
        known = self._fused_for
        if known is None or known[0] is not self.config or known[1] != units:
            c = self.config
            self._fused_for = (c, units)
            fused = (
                c.strategy in FUSED_STRATEGIES
                and c.granularity in granularities
                and c.budget == "topk"
                and c.density < 1.0
                and c.backend in (None, "cpu")
            )
            self._fused_keep = amu.keep_count(c.density, units) if fused else 0
        return self._fused_keep

    def fused_call(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call may take a fused CPU route (one kernel call for the AMU's top-k and
        the product, with none of the mask's tensor ops or the dispatcher's work): float32
        inference on the CPU, outside calibration and autocast, ``SELACT_BACKEND`` unset or
        ``cpu``, the kernels built (asked only for CPU inputs: a GPU run never compiles them).
        The same masks and outputs as the general route."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and weight.dtype == torch.float32
            and self.score_sample is None
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu")
            and os.environ.get(ENV_VAR) in (None, "", "cpu")
            and cpu.available()
        )

    def _fused_linear_groups(self, x: torch.Tensor, weight: torch.Tensor) -> int:
        """The runs of rows the fused linear route selects for (a sample's tokens for channel
        granularity, single rows for element), or 0: take the general route. The kernel's limit
        on runs (:func:`selact.mgemm.cpu.serves_runs`) applies: each run re-reads its weights."""
        k = weight.shape[1]
        if not self.fused_keep(k, ("element", "channel")) or x.dim() == 0 or k == 0:
            return 0
        rows = x.numel() // k
        groups = (
            rows if self.config.granularity == "element" else (x.shape[0] if x.dim() > 1 else 1)
        )
        ok = groups > 0 and cpu.serves_runs(groups, rows) and self.fused_call(x, weight)
        return groups if ok else 0

    def _fused_project(self, x, weight, bias, groups: int) -> tuple:
        """(mask shaped to broadcast over ``x``, or None when not counting; y; executed MACs)."""
        norms = None
        if self.config.strategy == "sapw":
            norms = self._input_norms(weight, "linear", 1).reshape(-1)
        counting = self.config.counting
        y, keep, executed = cpu.select_linear(
            x, weight, bias, groups=groups, keep=self._fused_keep, norms=norms, count=counting
        )
        mask = None
        if counting and self.config.granularity == "element":
            mask = keep.reshape(x.shape)
        elif counting:  # one feature mask per sample, broadcast over its tokens
            mask = keep.reshape(x.shape[0], *([1] * (x.dim() - 2)), -1) if x.dim() > 1 else keep[0]
        return mask, y, executed

    def check_input(
        self,
        x: torch.Tensor,
        *,
        dims: tuple[int, ...] | None = None,
        size: int | None = None,
        dim: int = -1,
    ) -> None:
        """Raise a clear error naming this layer if ``x`` is not a float tensor of ``dims``
        dimensions with ``size`` entries along ``dim``, or holds NaN or inf (``check_finite``)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise self.error(TypeError, f"expects a floating-point tensor, got {got}")
        if (dims is not None and x.dim() not in dims) or (
            size is not None and x.shape[dim] != size
        ):
            want = f"{' or '.join(map(str, dims))}-D" if dims else "a tensor"
            want += f" with {size} entries in dim {dim}" if size is not None else ""
            raise self.error(ValueError, f"expects {want}, got shape {tuple(x.shape)}")
        if self.config.check_finite and not _all_finite(x):
            raise self.error(
                ValueError,
                f"its input of shape {tuple(x.shape)} holds NaN or inf "
                "(set check_finite=False to skip this check)",
            )

    def mgemm_call(self, op, x, weight, bias, *args, mask):
        """``op`` (an MGEMM op) on the layer's operands with its input ``mask``, under the
        layer's counting and backend settings and with its name on any error: the general
        route's work."""
        with self.blame():
            return op(
                x,
                weight,
                bias,
                *args,
                in_mask=mask,
                count=self.config.counting,
                backend=self.config.backend,
            )

    @contextlib.contextmanager
    def blame(self) -> Iterator[None]:
        """Prefix this layer's name to the ValueError or TypeError raised inside (from MGEMM)."""
        try:
            yield
        except (ValueError, TypeError) as error:
            raise self.error(type(error), str(error)) from error

    def error(self, kind: type[Exception], message: str) -> Exception:
        """An exception of ``kind`` whose message starts with this layer's name."""
        return kind(f"selective layer {self.layer_name or type(self).__name__!r}: {message}")

    @torch.no_grad()
    def record(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        dense: int,
        zero_skip: torch.Tensor | int,
        executed: torch.Tensor | int,
    ) -> None:
        """Add one call's counts; ``mask`` gives the kept density over ``x``."""
        if not self.config.counting:
            return
        inputs = x.numel()
        if mask is None:
            kept = inputs
        else:
            kept = mask.sum(dtype=torch.int64) * (inputs // max(mask.numel(), 1))
        self.counter.add(
            x.device,
            dense_macs=dense,
            zero_skip_macs=zero_skip,
            executed_macs=executed,
            kept=kept,
            inputs=inputs,
        )

    def _fitted_threshold(self) -> torch.Tensor:
        if not self._threshold_checked:
            if bool(torch.isnan(self.threshold)):
                raise RuntimeError(
                    f"selective layer {self.layer_name!r} uses budget='threshold' but has no "
                    "threshold: run selact.calibrate(model, batches) first"
                )
            self._threshold_checked = True
        return self.threshold

    def _input_norms(self, weight: torch.Tensor, layout: str, groups: int) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced (the cache key is not): computed in the
            # graph, a constant where Inductor freezes the weights (torch._inductor.config.freezing)
            return amu.input_norms(weight, layout, groups)
        # Recomputed only when the weight changes (a new tensor, or an in-place update).
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, weight.shape)
        if key != self._norms_key:
            self._norms = amu.input_norms(weight, layout, groups)
            self._norms_key = key
        return self._norms

    def _load_from_state_dict(self, *args, **kwargs):
        self._threshold_checked = False
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        text = f"strategy={c.strategy}, density={c.density}, granularity={c.granularity}"
        if c.budget != "topk":
            text += f", budget={c.budget}"
        return text


def _all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN or inf. A finite sum proves it (a NaN or inf makes the sum NaN
    or inf) in one pass with no tensor of flags (16 x 32 x 32 floats: 7 against 37 us on a loaded
    core); only a sum that overflows or hides a NaN is checked element by element."""
    x = x.detach()
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
