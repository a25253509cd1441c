"""The generic training loop: dense training and mask-aware fine-tuning of any :class:`Task`.

:func:`fit` trains ``model`` on ``task`` as :class:`TrainConfig` says. If ``model`` has been
converted with :func:`selact.sparsify`, training is *mask-aware fine-tuning*: every selective
layer recomputes its mask in every forward pass (the reference MGEMM path; gradients reach kept
inputs only), optionally with a density schedule that lowers each layer's density from 1.0 to its
configured target and with distillation from a dense teacher. Nothing else differs, so the same
loop serves the dense-fine-tuning control.

What the loop provides for every task:

- SGD (Nesterov) or AdamW; weight decay on weights only (not on norms or biases); linear warmup,
  then linear or cosine decay to zero, set per step from the global step (so resume needs no
  scheduler state);
- bf16 autocast on CUDA (``amp="auto"``), channels-last, optional ``torch.compile``;
- optionally (``cuda_graph``), the model's forward and backward replayed as CUDA graphs in dense
  training on one GPU, which removes Python's launch overhead from the step (on an H100 shared by
  three trainings it did not shorten their epochs: the GPU itself was the limit there);
- an EMA of the weights (``ema`` > 0): at the end, the EMA or the raw weights, whichever is
  better on the validation split, is evaluated and saved;
- optionally (``keep_best``, dense training), the weights of the periodic evaluation that scored
  best on the validation split, saved instead of the last ones where they score better (on an
  H100 ResNet-20's val accuracy peaked at epoch 160 of 200, 89.4 %, and fell to 88.2 % by the
  end); written with each training state where they changed (``run_dir/best.safetensors``, a
  model checkpoint with sidecar), so that a resumed run still ends with the best of the whole run;
- a training state after every ``checkpoint_every`` epochs, at most once per
  ``checkpoint_seconds`` (``run_dir/last.safetensors``), and a final model checkpoint
  (``run_dir/model.safetensors``), both with JSON sidecars; with
  ``resume=True`` a run picks up from its last state and ends exactly as an uninterrupted run
  (the data order and augmentation of each epoch depend only on the seed and the epoch);
- DDP under ``torchrun`` (NCCL on CUDA, gloo on the CPU): each rank trains on its share of every
  epoch, rank 0 evaluates, writes checkpoints and shows progress.

During training the selective layers run with ``counting=False`` and ``check_finite=False`` (both
cost a device sync or extra work per call); their configs are restored before evaluation and
saving.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from selact._provenance import commit
from selact.config import SelectiveConfig
from selact.nn.base import SelectiveModule
from selact.train.checkpoint import load_model, load_state, read_sidecar, save_model, save_state
from selact.train.task import Distill, Task

__all__ = [
    "FitResult",
    "TrainConfig",
    "autocast",
    "distributed_context",
    "fit",
    "hardware",
    "evaluate",
    "selective_layers",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run (recorded in its checkpoints' sidecars)."""

    epochs: int = 30
    batch_size: int = 512  # per process; under DDP the global batch is world_size times this
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    lr: float = 0.4  # peak learning rate
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    beta2: float = 0.999  # AdamW only
    weight_decay: float = 5e-4  # on weights with 2+ dims only
    schedule: str = "linear"  # decay after warmup: "linear" or "cosine" to zero, or "constant"
    warmup: float = 0.2  # fraction of the steps spent rising linearly to the peak
    warmup_start: float = 0.1  # the first step's learning rate, as a fraction of the peak
    grad_clip: float | None = None  # clip the global gradient norm to this
    ema: float = 0.0  # EMA decay per step (0: no EMA); e.g. 0.999. At the end the EMA or the
    # raw weights are kept, whichever scores better on "val"
    ema_every: int = 4  # update the EMA every this many steps (with decay ** ema_every)
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on the CPU), "bf16", "fp16" or "off"
    channels_last: str = "auto"  # "auto" (on CUDA), "on" or "off"
    compile: bool = False  # torch.compile the training model (evaluation stays eager)
    cuda_graph: bool = False  # dense training on one CUDA device: forward and backward as CUDA
    # graphs (checked against eager first; eager where capture fails or elsewhere)
    seed: int = 0  # weight init is the caller's; this seeds data order, augmentation, dropout
    eval_every: int = 1  # evaluate on eval_split every this many epochs (0: only at the end)
    eval_split: str = "val"
    keep_best: bool = False  # dense training: end with the periodic evaluation's best weights on
    # eval_split (which must then be "val") where they beat the last ones
    eval_batch_size: int = 1000
    checkpoint_every: int = 1  # write the training state every this many epochs (0: never)
    checkpoint_seconds: float = 0.0  # ... and at most once per this many seconds (the last
    # epoch's state is always written): on a GPU, where an epoch takes a second, writing every
    # epoch would cost as much as training (VGG-16: 0.5 s a state)
    # With a time limit the schedules run on max(step / total steps, seconds / limit) and
    # training stops when that reaches 1: ``epochs`` becomes a maximum. The seconds are the run's
    # wall time, evaluations and checkpoints included, and the final evaluation's expected time
    # is held back (timed by an evaluation after the first epoch and by the periodic ones), so
    # that ``fit`` returns within the limit. The result depends on the machine's speed; the
    # sidecar records the epochs actually done.
    time_limit: float | None = None
    # Mask-aware fine-tuning (models converted by selact.sparsify):
    density_schedule: str = "constant"  # "constant", or "linear"/"cosine" from 1.0 to target
    density_warmup: float = 0.5  # fraction of the steps over which the density falls
    distill: float = 0.0  # weight of distillation from the teacher (needs a teacher)
    temperature: float = 4.0  # distillation temperature

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("sgd", "adamw"),
            "schedule": ("linear", "cosine", "constant"),
            "amp": ("auto", "bf16", "fp16", "off"),
            "channels_last": ("auto", "on", "off"),
            "density_schedule": ("constant", "linear", "cosine"),
        }
        for name, known in choices.items():
            if getattr(self, name) not in known:
                raise ValueError(f"{name} must be one of {known}, got {getattr(self, name)!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.keep_best and self.eval_split != "val":
            raise ValueError("keep_best chooses on val: eval_split must be 'val'")
        if self.checkpoint_seconds < 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **fields: Any) -> TrainConfig:
        return dataclasses.replace(self, **fields)

    def matches(self, recorded: Any) -> bool:
        """Whether a checkpoint's recorded config (a dict) is this one; fields added to
        TrainConfig after the checkpoint was written match when this config has their
        default."""
        if not isinstance(recorded, dict):
            return False
        defaults = TrainConfig().to_dict()
        return set(recorded) <= set(defaults) and all(
            recorded.get(key, defaults[key]) == value for key, value in self.to_dict().items()
        )


@dataclasses.dataclass
class FitResult:
    """The trained model (the EMA if kept), its final metrics per split, and the history."""

    model: nn.Module
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    train_seconds: float
    checkpoint: Path | None
    info: dict[str, Any]


def distributed_context() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def hardware(device: torch.device | str) -> str:
    """A short description of the device, for result rows and sidecars."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"CPU {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )


def selective_layers(model: nn.Module) -> list[SelectiveModule]:
    return [m for m in model.modules() if isinstance(m, SelectiveModule)]


@contextlib.contextmanager
def _layer_configs(
    layers: list[SelectiveModule], targets: list[SelectiveConfig]
) -> Iterator[Callable[[float], None]]:
    """Run with training configs (no counting, no finite check); yields ``set(fraction)`` that
    puts each layer at ``1 - fraction * (1 - target density)``. Restores the targets after."""
    cache: dict[tuple[int, float], SelectiveConfig] = {}

    def put(fraction: float) -> None:
        for i, (layer, target) in enumerate(zip(layers, targets, strict=True)):
            density = 1.0 - fraction * (1.0 - target.density)
            key = (i, round(density, 6))
            if key not in cache:
                cache[key] = target.replace(
                    density=min(1.0, density), counting=False, check_finite=False
                )
            layer.config = cache[key]

    try:
        put(1.0)
        yield put
    finally:
        for layer, target in zip(layers, targets, strict=True):
            layer.config = target


def _density_fraction(config: TrainConfig, progress: float) -> float:
    """How far each layer's density has fallen from 1.0 to its target, at ``progress``."""
    if config.density_schedule == "constant" or config.density_warmup <= 0:
        return 1.0
    t = min(1.0, progress / config.density_warmup)
    return t if config.density_schedule == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)


def _lr(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` in [0, 1] of the run."""
    warm = config.warmup
    if progress < warm:
        return config.lr * (config.warmup_start + (1 - config.warmup_start) * progress / warm)
    if config.schedule == "constant":
        return config.lr
    t = min(1.0, (progress - warm) / max(1e-12, 1.0 - warm))
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - t)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _optimizer(model: nn.Module, config: TrainConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":  # foreach (the CUDA default) is plenty for these sizes
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    fused = {"fused": True} if device.type == "cuda" else {}  # fused AdamW: torch >= 2.0
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, config.beta2), **fused)


def autocast(config: TrainConfig, device: torch.device, *, cache_enabled: bool = True):
    """The autocast context of ``config.amp`` on ``device`` (a null context when off); CUDA graph
    capture needs ``cache_enabled=False``."""
    amp = config.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


@contextlib.contextmanager
def _cuda_graphed(
    model: nn.Module, loader, config: TrainConfig, device: torch.device, why_not: str | None
) -> Iterator[bool]:
    """Replays ``model``'s training forward and backward as CUDA graphs
    (``torch.cuda.make_graphed_callables``: the optimizer, loss and EMA stay eager) while the
    context is open, if ``config.cuda_graph`` asks and nothing rules it out (``why_not``); yields
    whether it does. The graphed model is first checked against the eager one on one batch
    (outputs and gradients); a failed capture or check leaves training eager, with a warning.
    Warm-up and check do not change the model (its state is restored); on exit the model's own
    forward is back."""
    if not config.cuda_graph or why_not:
        if config.cuda_graph and device.type == "cuda":
            log.warning("CUDA graphs off: %s", why_not)
        yield False
        return
    model.train()
    x = next(iter(loader))[0]
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    try:
        with autocast(config, device, cache_enabled=False):
            torch.cuda.make_graphed_callables(model, (x,), num_warmup_iters=3)
        graphed = _graph_agrees(model, x, config, device)
        if not graphed:
            log.warning("CUDA graphs off: the graphed model disagrees with the eager one")
    except RuntimeError as error:
        log.warning("CUDA graphs off: capture failed (%s)", error)
        graphed = False
    model.load_state_dict(saved)  # undo the warm-up's and the check's batch-norm statistics
    if not graphed:
        model.__dict__.pop("forward", None)
    try:
        yield graphed
    finally:
        model.__dict__.pop("forward", None)  # make_graphed_callables set it on the instance


def _why_not_graphed(device, selective: bool, world: int, config: TrainConfig) -> str | None:
    """Why the training step cannot be replayed as CUDA graphs (None: it can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if selective:
        return "mask-aware fine-tuning (masks and densities change every step)"
    if world > 1:
        return "DDP"
    if config.compile:
        return "torch.compile"
    return None


def _graph_agrees(model: nn.Module, x: torch.Tensor, config: TrainConfig, device) -> bool:
    """Whether the graphed forward (``model.forward``) and the module's own give the same outputs
    and parameter gradients on ``x`` (within bf16 rounding: 2 % of the norm)."""
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for forward in (model.forward, type(model).forward.__get__(model)):
        with autocast(config, device):
            out = forward(x)
        grads = torch.autograd.grad(out.float().logsumexp(-1).mean(), params)
        results.append([t.detach().float().clone() for t in (out, *grads)])
    return all((a - b).norm() <= 0.02 * b.norm() + 1e-6 for a, b in zip(*results, strict=True))


class _BestWeights:
    """The weights of the periodic evaluation that scored best (``keep_best``): a copy of the
    evaluated model, written beside the training state where it changed (``path``), and taken
    back on resume when the state names it (the state's ``best`` entry: epoch and score), so
    that neither a file of another run nor one newer than the state is ever used."""

    def __init__(self, task: Task, path: Path | None) -> None:
        self.higher = task.higher_is_better
        self.path = path
        self.score: float | None = None
        self.epoch = 0
        self.module: nn.Module | None = None
        self.unsaved = False

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher else a < b

    def beats(self, score: float) -> bool:
        """Whether the kept weights score strictly better than ``score``."""
        return self.score is not None and self._better(self.score, score)

    def _copy(self, model: nn.Module) -> nn.Module:
        module = copy.deepcopy(model)
        module.__dict__.pop("forward", None)  # a CUDA-graphed forward stays with the original
        return module.requires_grad_(False)

    def offer(self, model: nn.Module, score: float, epoch: int) -> None:
        if self.score is None or self._better(score, self.score):
            self.score, self.epoch, self.unsaved = score, epoch, True
            if self.module is None:
                self.module = self._copy(model)
            else:
                self.module.load_state_dict(model.state_dict())

    def meta(self) -> dict[str, Any] | None:
        """What a training state records of the best weights (None: none yet)."""
        return None if self.score is None else {"epoch": self.epoch, "score": self.score}

    def write(self) -> None:
        """Write the weights if they changed since the last write (before the state names them)."""
        if self.unsaved and self.path is not None and self.module is not None:
            save_model(self.module, self.path, {"best": self.meta()})
            self.unsaved = False

    def resume(self, model: nn.Module, named: dict[str, Any] | None) -> None:
        """Take back the weights a resumed state names (``named``), if their file is that one."""
        if named is None or self.path is None:
            return
        if not self.path.is_file() or read_sidecar(self.path).get("best") != named:
            log.warning("%s: not the best weights the training state names; lost", self.path)
            return
        self.module = self._copy(model)
        load_model(self.module, self.path)
        self.score, self.epoch = named["score"], named["epoch"]


class _RunClock:
    """A run's wall time against ``config.time_limit`` (see TrainConfig): steps, evaluations and
    checkpoints all count, and ``final_evals`` times the last periodic evaluation's duration is
    held back for the evaluation after the last epoch (the first epoch ends with an evaluation
    to time it, periodic or not; a limit that ends inside the first epoch holds nothing back).
    Under DDP rank 0's clock decides for every rank, so that all stop at the same step."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        spent: float,
        final_evals: float,
        world: int,
        device: torch.device,
    ) -> None:
        self.limit = config.time_limit
        self.spent = spent  # by earlier processes of a resumed run
        self.final_evals = final_evals
        self.world, self.device = world, device
        self.start = self.last_checkpoint = time.perf_counter()
        self.eval_seconds = 0.0

    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.start

    def progress(self) -> float:
        """The fraction of the time limit used, the final evaluation's time held back."""
        budget = self.limit - self.final_evals * self.eval_seconds
        progress = self.elapsed() / budget if budget > 0 else math.inf
        if self.world > 1:
            shared = torch.tensor([progress], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, src=0)
            progress = float(shared)
        return progress

    @contextlib.contextmanager
    def timing_evaluation(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.eval_seconds = time.perf_counter() - start

    def needs_timing(self) -> bool:
        """Whether an evaluation should run now to time the final one: with a time limit, the
        first epoch of a run (or of its resumption) ends with one."""
        return bool(self.limit) and self.eval_seconds == 0.0

    def checkpoint_due(self, min_seconds: float) -> bool:
        return time.perf_counter() - self.last_checkpoint >= min_seconds

    def checkpoint_written(self) -> None:
        self.last_checkpoint = time.perf_counter()


def _final_evaluations(
    task: Task, config: TrainConfig, splits: tuple[str, ...], ema: bool
) -> float:
    """How many periodic evaluations (of ``config.eval_split``) the end of :func:`fit` costs,
    counted in batches: the last epoch's own (with periodic evaluations), the final splits, and
    val twice more where the EMA is compared."""

    def batches(split: str) -> int:
        return len(task.loader(split, batch_size=config.eval_batch_size, train=False))

    evaluated = [
        *([config.eval_split] if config.eval_every else []),
        *splits,
        *(["val", "val"] if ema and "val" in task.splits else []),
    ]
    return sum(batches(split) for split in evaluated) / max(1, batches(config.eval_split))


class _Ema:
    """Exponential moving average of parameters and float buffers (timm's ModelEmaV2 rule)."""

    def __init__(self, model: nn.Module, decay: float, every: int) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.every, self.updates = decay, every, 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.every:
            return
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) ** self.every
        ema = [t for t in self.module.state_dict().values() if t.is_floating_point()]
        new = [t for t in model.state_dict().values() if t.is_floating_point()]
        torch._foreach_lerp_(ema, new, 1.0 - decay)


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, split: str, config: TrainConfig, *, world_size: int = 1
) -> dict[str, float]:
    """``task.evaluate`` of ``model`` in eval mode on a whole split, under the run's autocast."""
    device = task.device
    was_training = model.training
    model.eval()
    try:
        loader = task.loader(split, batch_size=config.eval_batch_size, train=False)
        with autocast(config, device):
            return task.evaluate(model, loader)
    finally:
        model.train(was_training)


def fit(
    task: Task,
    model: nn.Module,
    config: TrainConfig,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    teacher: nn.Module | None = None,
    resume: bool = True,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    final_splits: tuple[str, ...] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    evaluations_after: int = 0,
) -> FitResult:
    """Train ``model`` on ``task``; see the module docstring.

    Args:
        task: the data, loss and metrics.
        model: a dense model, or one converted by :func:`selact.sparsify` (fine-tuning); it is
            moved to ``task.device`` and trained in place.
        config: the run's settings.
        run_dir: where ``last.safetensors`` and ``model.safetensors`` go (``None``: nowhere).
        teacher: a dense model for distillation (``config.distill > 0``).
        resume: continue from ``run_dir/last.safetensors`` if it is there.
        progress: show a progress bar (rank 0 only).
        info: extra JSON-ready facts for the sidecars (command, model name, ...).
        final_splits: splits evaluated at the end (default: every split but "train").
        on_epoch_end: ``f(epoch, record)`` after each epoch's checkpoint (rank 0 only).
        evaluations_after: how many times the caller evaluates ``final_splits`` once ``fit``
            returns, inside the same time limit: their time is held back too.
    """
    code = commit()  # the code this process runs, whatever the checkout holds by its end
    rank, world, _ = distributed_context()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if task.device.type == "cuda" else "gloo")
    device = task.device
    is_main = rank == 0
    run_dir = Path(run_dir) if run_dir is not None else None
    if config.distill > 0 and teacher is None:
        raise ValueError("config.distill > 0 needs a teacher model")

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its kernels
    model.to(device)
    channels_last = config.channels_last == "on" or (
        config.channels_last == "auto" and device.type == "cuda"
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    distill = None
    if teacher is not None and config.distill > 0:
        teacher = teacher.to(device).eval()  # the task runs it without gradients
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        distill = Distill(teacher, config.distill, config.temperature)

    layers = selective_layers(model)
    targets = [layer.config for layer in layers]
    optimizer = _optimizer(model, config, device)
    ema = _Ema(model, config.ema, config.ema_every) if config.ema > 0 else None
    torch.manual_seed(config.seed)  # dropout and any other global randomness of the loop
    loader = task.loader(
        "train",
        batch_size=config.batch_size,
        train=True,
        seed=config.seed,
        rank=rank,
        world_size=world,
    )
    total = config.epochs * len(loader)  # steps
    meta: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "train_seconds": 0.0}
    state_path = run_dir / "last.safetensors" if run_dir is not None else None
    if resume and state_path is not None and state_path.is_file():
        meta = load_state(
            state_path, model=model, optimizer=optimizer, ema=ema.module if ema else None
        )
        if not config.matches(meta.get("config")):
            raise ValueError(
                f"{state_path} was written by a run with another config; use a new run folder "
                "or resume=False"
            )
        if ema is not None:
            ema.updates = meta["ema_updates"]
        log.info("resuming %s at epoch %d", run_dir, meta["epoch"])

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        train_model = torch.compile(train_model)
    why_not_graph = _why_not_graphed(device, bool(layers), world, config)
    eval_model = ema.module if ema is not None else model
    step, history = meta["step"], meta["history"]
    train_seconds = meta["train_seconds"]
    if final_splits is None:
        final_splits = tuple(s for s in task.splits if s != "train")
    clock = _RunClock(
        config,
        spent=meta.get("wall_seconds", train_seconds),
        final_evals=_final_evaluations(
            task, config, final_splits * (1 + evaluations_after), ema is not None
        )
        if config.time_limit and is_main
        else 0.0,
        world=world,
        device=device,
    )
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"{task.name} train",
        unit="step",
        disable=not (progress and is_main),
        leave=False,
        file=sys.stderr,
    )
    with (
        _layer_configs(layers, targets) as set_density,
        _cuda_graphed(model, loader, config, device, why_not_graph) as graphed,
    ):
        if graphed:
            log.info("%s: forward and backward replayed as CUDA graphs", task.name)
        if ema is not None:
            ema_layers = selective_layers(ema.module)
        out_of_time = meta.get("out_of_time", False)
        best = None
        if config.keep_best and is_main and not layers:
            best = _BestWeights(task, run_dir / "best.safetensors" if run_dir else None)
            best.resume(eval_model, meta.get("best"))
        lr = 0.0
        for epoch in range(meta["epoch"], config.epochs):
            if out_of_time:
                break
            model.train()
            loader.set_epoch(epoch)
            start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            steps_before = step
            for batch in loader:
                progress = step / max(1, total)
                if config.time_limit:
                    progress = max(progress, clock.progress())
                    if progress >= 1.0:
                        out_of_time = True
                        break
                lr = _lr(config, progress)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if layers:
                    set_density(_density_fraction(config, progress))
                with autocast(config, device):
                    loss = task.loss(train_model, batch, distill=distill)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update(model, step)
                loss_sum += loss.detach()
                step += 1
                bar.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            train_seconds += seconds
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "lr": lr,
                "train_loss": float(loss_sum) / max(1, step - steps_before),
                "seconds": seconds,
            }
            last = epoch + 1 == config.epochs or out_of_time
            periodic = config.eval_every and (epoch + 1) % config.eval_every == 0
            if is_main and (periodic or (config.eval_every and last) or clock.needs_timing()):
                if ema is not None:  # the EMA follows the current density schedule too
                    for layer, trained in zip(ema_layers, layers, strict=True):
                        layer.config = trained.config
                with clock.timing_evaluation():
                    metrics = evaluate(task, eval_model, config.eval_split, config)
                record[config.eval_split] = metrics
                if best is not None:
                    best.offer(eval_model, metrics[task.primary_metric], epoch + 1)
            if config.time_limit and not last and clock.progress() >= 1.0:
                out_of_time = last = True  # no time for another epoch: this one's state is written
            history.append(record)
            bar.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.3f}")
            log.info("%s epoch %d/%d: %s", task.name, epoch + 1, config.epochs, record)
            meta = {
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "train_seconds": train_seconds,
                "wall_seconds": clock.elapsed(),
                "config": config.to_dict(),
                "ema_updates": ema.updates if ema else 0,
                "out_of_time": out_of_time,
                "best": best.meta() if best is not None else None,
                "seed": config.seed,
                "data": task.describe(),
                **(info or {}),
            }
            if is_main and state_path is not None and config.checkpoint_every:
                if last or (
                    (epoch + 1) % config.checkpoint_every == 0
                    and clock.checkpoint_due(config.checkpoint_seconds)
                ):
                    clock.checkpoint_written()
                    if best is not None:
                        best.write()
                    save_state(
                        state_path,
                        model=model,
                        optimizer=optimizer,
                        ema=ema.module if ema else None,
                        meta=meta,
                    )
            if world > 1:
                dist.barrier()
            if is_main and on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    bar.close()

    if ema is not None:
        for layer, target in zip(selective_layers(ema.module), targets, strict=True):
            layer.config = target
    splits = final_splits
    metrics: dict[str, dict[str, float]] = {}
    checkpoint = None
    final_info = {
        "config": config.to_dict(),
        "seed": config.seed,
        "data": task.describe(),
        "train_seconds": train_seconds,
        "epochs": config.epochs,
        "epochs_done": step / max(1, len(loader)),
        "hardware": hardware(device),
        "commit": code,
        "world_size": world,
        "ema": config.ema > 0,
        **(info or {}),
    }
    pm = task.primary_metric
    last_val = history[-1].get("val", {}).get(pm) if history else None
    if is_main and ema is not None and "val" in task.splits and len(history):
        # Keep the EMA or the raw weights, whichever is better on val (never on test).
        raw = evaluate(task, model, "val", config)[pm]
        avg = evaluate(task, ema.module, "val", config)[pm]
        better = avg >= raw if task.higher_is_better else avg <= raw
        eval_model = ema.module if better else model
        final_info["ema_chosen"] = better
        final_info["val_raw_vs_ema"] = [raw, avg]
        last_val = avg if better else raw
    if best is not None and best.module is not None:
        if last_val is None or best.beats(last_val):  # the periodic evaluations' models
            eval_model = ema.module if ema is not None else model
            eval_model.load_state_dict(best.module.state_dict())
            final_info["best_epoch"] = best.epoch
        final_info["val_best_vs_last"] = [best.score, last_val]
    if ema is not None:
        for param in ema.module.parameters():  # a model like any other from here on
            param.requires_grad_(True)
    if is_main:
        for split in splits:
            metrics[split] = evaluate(task, eval_model, split, config)
        log.info("%s final: %s", task.name, metrics)
        final_info["metrics"] = metrics
        final_info["history"] = history
        if run_dir is not None:
            checkpoint = run_dir / "model.safetensors"
            final_info = save_model(eval_model, checkpoint, final_info)
    if world > 1:
        dist.barrier()
    return FitResult(
        model=eval_model,
        metrics=metrics,
        history=history,
        train_seconds=train_seconds,
        checkpoint=checkpoint,
        info=final_info,
    )
