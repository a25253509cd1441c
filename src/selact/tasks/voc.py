"""Pascal VOC detection as a :class:`selact.train.Task`: VOC mAP@0.5 on the val split.

Splits are the VOCdevkit image sets ``train`` and ``val`` (for the project's VOC2007 archive: a
fixed split of the official test images, see ``../shared/data/README.md``). There is no held-out
test split: results are reported on ``val``, and say so.

Images are decoded with PIL and augmented per image with torchvision's transforms v2
(:func:`selact.data.voc.train_transform`: photometric distortion, IoU crop, flip, letterbox to
``image_size``); evaluation letterboxes only. The augmentation of an item is seeded by
``(seed, epoch, position in the epoch)``, so an epoch is the same with any number of loader
workers and after a resume. Batches are ``(images, targets)``: ``(B, 3, S, S)`` float images in
[0, 1] on the task's device and a list of dicts (``boxes`` xyxy in input pixels, ``labels``,
``difficult``, ``index``).

Metrics (:meth:`VOC.evaluate`): ``map50`` (the primary metric: VOC all-point AP at IoU 0.5,
difficult boxes ignored, mean over classes, a fraction), ``map50_07`` (VOC2007's 11-point
variant), and torchmetrics' COCO-style ``coco_map`` (IoU 0.5:0.95) and ``coco_map50``. Detections
are mapped back to the original image's pixels and scored against the untransformed truth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from selact.data.voc import (
    CLASSES,
    VOCDataset,
    collate,
    eval_transform,
    letterbox_factors,
    train_transform,
)
from selact.metrics import VOCMeanAP, coco_map
from selact.models.det import CPU_PRESET, SMOKE_PRESET
from selact.train.task import Distill, Task, TaskOptions, register_task

__all__ = ["VOC", "VOCLoader", "PRESETS"]

log = logging.getLogger(__name__)

#: Model sizes by scale: ``full`` is ``det``'s defaults (input 256), ``cpu`` the reduced model
#: that trains on 2 CPU cores, ``smoke`` a tiny one for tests (seconds).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"image_size": 256},
    "cpu": dict(CPU_PRESET),
    "smoke": dict(SMOKE_PRESET),
}
#: Largest evaluation batch, whatever the loop asks for: a batch of 1,000 letterboxed images and
#: the head's outputs would take gigabytes, and detection post-processing is per image anyway.
EVAL_BATCH_CAP = 64


class _Seeded(torch.utils.data.Dataset):
    """Items ``(index, seed)``: the dataset's item ``index`` with the torch RNG seeded by
    ``seed`` (transforms v2 draw from the global generator), restored afterwards."""

    def __init__(self, dataset: VOCDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class VOCLoader:
    """An epoch of ``(images, targets)`` batches on ``device``; see the module docstring.

    Training loaders shuffle by ``(seed, epoch)``, give each rank ``rank::world_size`` of the
    order cut to the same length, and drop the last partial batch when there is more than one.
    """

    def __init__(
        self,
        dataset: VOCDataset,
        batch_size: int,
        *,
        device: torch.device,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.per_rank = len(dataset) // world_size if train else len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.per_rank, self.batch_size
        return n // b if self.train and n > b else -(-n // b)

    def _keys(self) -> list[tuple[int, int]]:
        if not self.train:
            return [(i, 0) for i in range(len(self.dataset))]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (len(order),), generator=generator).tolist()
        keys = list(zip(order, seeds, strict=True))
        return keys[self.rank :: self.world_size][: self.per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
        keys = self._keys()
        batches = [keys[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]
        loader = torch.utils.data.DataLoader(
            _Seeded(self.dataset),
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for images, targets in loader:
            images = images.to(self.device, non_blocking=True)
            targets = [
                {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                for t in targets
            ]
            yield images, targets


@register_task("voc")
class VOC(Task):
    """VOC detection (see the module docstring).

    Args:
        options: data location (see :func:`selact.data.voc.find_voc`), device, limits (the
            first ``train_limit`` / ``eval_limit`` images of a set).
        preset: model scale, a key of :data:`PRESETS`; sets ``image_size`` unless given.
        image_size: letterboxed input side in pixels (a multiple of 32).
        year: VOC year (``None``: the one in the tree).
        crop_p: probability of the IoU crop in training augmentation.
        num_workers: loader worker processes (``None``: 0 on the CPU, up to 8 on CUDA).
        coco: also compute torchmetrics' COCO-style mAP (a few seconds per evaluation).
    """

    primary_metric = "map50"
    higher_is_better = True
    splits = ("train", "val")

    def __init__(
        self,
        options: TaskOptions,
        *,
        preset: str = "full",
        image_size: int | None = None,
        year: str | None = None,
        crop_p: float = 0.5,
        num_workers: int | None = None,
        coco: bool = True,
    ) -> None:
        super().__init__(options)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        self.preset = preset
        self.image_size = image_size or PRESETS[preset]["image_size"]
        self.crop_p, self.coco = crop_p, coco
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0
        self.num_workers = num_workers
        limits = {"train": options.train_limit, "val": options.eval_limit}
        self.datasets = {
            split: VOCDataset(options.data, split, year=year, limit=limits[split])
            for split in self.splits
        }
        self.year = self.datasets["train"].year
        #: predictions and truth of the last :meth:`evaluate`, in original image pixels
        self.last_predictions: dict[str, Any] | None = None

    def loader(self, split, *, batch_size, train=False, seed=0, rank=0, world_size=1):
        self.check_split(split)
        dataset = self.datasets[split]
        dataset.transform = (
            train_transform(self.image_size, self.crop_p)
            if train
            else eval_transform(self.image_size)
        )
        return VOCLoader(
            dataset,
            batch_size if train else min(batch_size, EVAL_BATCH_CAP),
            device=self.device,
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
        )

    def loss(self, model: nn.Module, batch, *, distill: Distill | None = None) -> torch.Tensor:
        if distill is not None:
            raise NotImplementedError("the VOC task has no distillation loss")
        images, targets = batch
        losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        dataset = loader.dataset
        metric = VOCMeanAP(len(CLASSES))
        metric07 = VOCMeanAP(len(CLASSES), use_07_metric=True)
        for images, targets in loader:
            detections = model(images)
            predictions, truth = [], []
            for det, target in zip(detections, targets, strict=True):
                record = dataset.records[target["index"]]
                _, _, sy, sx = letterbox_factors(record.height, record.width, self.image_size)
                scale = torch.tensor([sx, sy, sx, sy], device=det["boxes"].device)
                boxes = det["boxes"].float() / scale
                limit = torch.tensor(
                    [record.width, record.height] * 2, device=boxes.device, dtype=boxes.dtype
                )
                boxes = boxes.clamp_min(0).minimum(limit)
                predictions.append(
                    {"boxes": boxes, "scores": det["scores"].float(), "labels": det["labels"]}
                )
                truth.append(record.target())
            metric.update(predictions, truth)
            metric07.update(predictions, truth)
        result = metric.compute()
        metrics = {"map50": result.map, "map50_07": metric07.compute().map}
        for name, ap in zip(CLASSES, result.ap, strict=True):
            metrics[f"ap50_{name}"] = ap
        if self.coco:
            try:
                coco = coco_map(metric.predictions, metric.targets)
            except ImportError as error:  # torchmetrics or pycocotools missing (a bare GPU box)
                log.warning("COCO mAP skipped: %s", error)
                self.coco = False
            else:
                metrics.update(coco_map=coco["map"], coco_map50=coco["map_50"])
        self.last_predictions = {
            "predictions": metric.predictions,
            "targets": metric.targets,
            "classes": list(CLASSES),
            "image_ids": [r.image_id for r in dataset.records],
        }
        return metrics

    def forward(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """The head's raw outputs (class logits, box regression, centre-ness), which have the
        same shape for any masks, for the budget search's sensitivity."""
        images = self.inputs(batch)
        image_list, _ = model.transform(list(images))
        features = list(model.backbone(image_list.tensors).values())
        return model.head(features)

    def model_kwargs(self) -> dict[str, Any]:
        return {**PRESETS[self.preset], "num_classes": len(CLASSES), "image_size": self.image_size}

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "data": self.options.data,
            "year": self.year,
            "sizes": {split: len(ds) for split, ds in self.datasets.items()},
            "report_split": "val",
            "train_limit": self.options.train_limit,
            "eval_limit": self.options.eval_limit,
            "preset": self.preset,
            "image_size": self.image_size,
            "crop_p": self.crop_p,
        }
