"""The task interface: what the generic training loop needs to know about a data set and its loss.

A *task* (CIFAR-10 classification, VOC detection, ...) owns its data, its loss and its metrics;
:func:`selact.train.fit` owns everything else (optimizer, schedule, mixed precision, EMA,
checkpoints, resume, DDP, density schedule). A task is a :class:`Task` subclass registered by
name and built from :class:`TaskOptions` plus its own keyword arguments::

    @register_task("cifar10")
    class Cifar10(Task):
        primary_metric = "top1"          # the metric settings are chosen on (on "val")
        higher_is_better = True

        def __init__(self, options: TaskOptions, *, label_smoothing: float = 0.1): ...
        def loader(self, split, *, batch_size, train=False, seed=0, rank=0, world_size=1): ...
        def loss(self, model, batch, *, distill=None): ...      # a 0-dim tensor to minimise
        def evaluate(self, model, loader): ...                  # {"top1": 0.91, ...}

    task = create_task("cifar10", TaskOptions(data="../shared/data", device="cuda"))

Contract, method by method:

- ``splits``: the split names the task serves; ``"train"`` trains, ``"val"`` chooses settings,
  ``"test"`` only reports (a task without a test split may report on "val" and must say so).
- ``loader(split, batch_size=..., train=..., seed=..., rank=..., world_size=...)`` returns a
  :class:`Loader`: an iterable of batches already on ``options.device``, with ``len()`` (batches
  per epoch) and ``set_epoch(epoch)``. With ``train=True`` it shuffles and augments, and the order
  and augmentation of epoch ``e`` depend only on ``(seed, e)``, so a resumed run repeats an
  uninterrupted one. Under DDP each rank gets ``rank::world_size`` of every epoch's order and the
  same number of batches. Evaluation loaders (``train=False``) give every item once, in order.
- ``loss(model, batch, distill=None)``: the training loss of ``model`` (in train mode) on one
  batch. With ``distill`` (:class:`Distill`: a teacher in eval mode, a weight and a temperature)
  the task mixes in a distillation term; a task that cannot distil raises NotImplementedError.
  The loop runs it under autocast and calls ``backward`` on the result.
- ``evaluate(model, loader) -> dict[str, float]``: metrics of ``model`` (the loop has put it in
  eval mode and disabled gradients) over a whole evaluation loader; must contain
  ``primary_metric``. Fractions in [0, 1] for accuracies and mAPs.
- ``inputs(batch)``: the model input of a batch (``model(inputs(batch))``), for calibration and
  the budget search. Default: ``batch[0]``.
- ``forward(model, batch)``: the model's outputs on a batch as compared by ``sensitivity``.
  Default: ``model(self.inputs(batch))``.
- ``sensitivity(outputs, reference) -> Tensor``: how far a selective model's outputs are from the
  dense model's on the same batch (0-dim, >= 0), for :func:`selact.amu.budget_search`.
  Default: mean squared error over every tensor in the outputs.
- ``model_kwargs()``: keyword arguments for :func:`selact.models.create_model` (e.g.
  ``num_classes``).
- ``describe()``: JSON-ready provenance of the data (source, split sizes, seed) for checkpoint
  sidecars and result rows.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from selact._registry import Registry

__all__ = [
    "Distill",
    "Loader",
    "TASKS",
    "Task",
    "TaskOptions",
    "create_task",
    "list_tasks",
    "register_task",
]


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Settings every task understands; task-specific ones are keyword arguments of its class.

    Args:
        data: where the data is (a folder or an archive); ``None`` lets the task look in its
            default places (``$SELACT_DATA``, the cache folder).
        download: allow a download into the cache folder if no data is found.
        device: where batches are put (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        split_seed: chooses the held-out validation items; fixed per experiment.
        train_limit: use only this many training items (a class-balanced, seeded subset).
        eval_limit: use only this many items of each evaluation split.
        channels_last: give image batches in channels-last memory format.
    """

    data: str | None = None
    download: bool = False
    device: str = "cpu"
    split_seed: int = 0
    train_limit: int | None = None
    eval_limit: int | None = None
    channels_last: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Distill:
    """Distillation from a teacher's outputs: ``(1 - weight) * task loss + weight * T² * KL``."""

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0


@runtime_checkable
class Loader(Protocol):
    """An epoch of batches on the task's device; ``set_epoch`` picks the order of epoch ``e``."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class Task:
    """Base class of tasks; see the module docstring for the contract of each method."""

    name: ClassVar[str] = ""
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(self, options: TaskOptions) -> None:
        self.options = options

    @property
    def device(self) -> torch.device:
        return torch.device(self.options.device)

    def loader(
        self,
        split: str,
        *,
        batch_size: int,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Loader:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, *, distill: Distill | None = None) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        raise NotImplementedError

    def inputs(self, batch: Any) -> Any:
        return batch[0]

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(self.inputs(batch))

    def sensitivity(self, outputs: Any, reference: Any) -> torch.Tensor:
        pairs = list(zip(_tensors(outputs), _tensors(reference), strict=True))
        if not pairs:
            raise ValueError("sensitivity: the outputs hold no tensors")
        return sum((a.float() - b.float()).pow(2).mean() for a, b in pairs) / len(pairs)

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, **self.options.to_dict()}

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"task {self.name!r} has no split {split!r}; known: {', '.join(self.splits)}"
            )


def _tensors(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for k in sorted(outputs) for t in _tensors(outputs[k])]
    if isinstance(outputs, list | tuple):
        return [t for item in outputs for t in _tensors(item)]
    return []


TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str):
    """Class decorator: registers a :class:`Task` subclass under ``name`` (and sets its name)."""

    def add(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS.register(name)(cls)
        return cls

    return add


def create_task(name: str, options: TaskOptions | None = None, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` from ``options`` and its own keyword arguments
    (settings it does not take: ValueError, naming them and the ones it takes)."""
    import selact.tasks  # noqa: F401  (registers the built-in tasks)

    cls = TASKS[name]
    params = inspect.signature(cls.__init__).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {p for p, info in params.items() if info.kind in named} - {"self", "options"}
    open_ended = any(info.kind is info.VAR_KEYWORD for info in params.values())
    unknown = sorted(set(kwargs) - accepted)
    if unknown and not open_ended:
        raise ValueError(
            f"task {name!r} has no setting {', '.join(unknown)}; its settings: "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(options or TaskOptions(), **kwargs)


def list_tasks() -> list[str]:
    import selact.tasks  # noqa: F401

    return TASKS.names()
