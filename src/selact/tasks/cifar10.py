"""CIFAR-10 classification as a :class:`selact.train.Task`: data kept on the device as uint8.

The training images minus a seeded, class-balanced validation split of ``val_size`` (5,000 by
default) train; ``val`` chooses every setting; ``test`` only reports. All images live on the
task's device as uint8 tensors (150 MB for the whole set), and each epoch is augmented there in
one pass: 4-pixel zero-padded random crop, horizontal flip, optionally an automatic augmentation
policy of torchvision (TrivialAugment, RandAugment or AutoAugment's CIFAR-10 policy, drawn per
group of images) and cutout. Training batches can be mixed (torchvision's MixUp and CutMix, one
of the two per batch), which gives soft labels. The random numbers come from a CPU generator
seeded by (seed, epoch), so an epoch is the same on any device and after a resume. Batches are
normalised with the usual CIFAR-10 mean and std.

Metrics: ``top1`` (the primary metric), ``top1_flip`` (logits averaged over the image and its
mirror: two forward passes per image, reported beside, never instead) and ``loss`` (plain
cross-entropy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from selact.data.cifar10 import CLASSES, MEAN, STD, load_cifar10, split_indices
from selact.train.task import Distill, Task, TaskOptions, register_task

__all__ = ["Cifar10", "augment", "TensorLoader"]

_FILL = tuple(round(255 * m) for m in MEAN)  # cutout fills with the mean colour (0 after norm)
# Automatic augmentation policies by name (torchvision's); geometric ones fill with the mean colour.
POLICIES = {
    "trivialaugment": lambda fill: v2.TrivialAugmentWide(fill=fill),
    "randaugment": lambda fill: v2.RandAugment(fill=fill),
    "autoaugment": lambda fill: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill),
}


@contextlib.contextmanager
def _global_rng(seed: int) -> Iterator[None]:
    """torchvision's random transforms draw from torch's global CPU generator: seed it from our
    own generator for the duration, and restore it after (CUDA generators are not touched)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _check_policy(auto_augment: str | None) -> None:
    if auto_augment is not None and auto_augment not in POLICIES:
        raise ValueError(
            f"auto_augment must be one of {sorted(POLICIES)} or None, got {auto_augment!r}"
        )


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator))


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    flip: bool = True,
    cutout: int = 0,
    auto_augment: str | None = None,
    auto_augment_group: int = 64,
    chunk: int = 8192,
) -> torch.Tensor:
    """Random crop after zero padding, horizontal flip, an automatic augmentation policy
    (``auto_augment``: a name in :data:`POLICIES`, or None) and cutout of a (N, C, H, W) uint8
    batch.

    The random numbers are drawn on the CPU from ``generator`` (so the result does not depend on
    the device); the pixels are moved on the images' device, ``chunk`` images at a time. The
    policy draws one operation and magnitude per group of ``auto_augment_group`` consecutive
    images (torchvision's transforms treat a batch as one image); the order is shuffled before,
    so the groups are random, and the cost is a few calls per group instead of per image.
    """
    _check_policy(auto_augment)
    if auto_augment_group < 1:
        raise ValueError(f"auto_augment_group must be positive, got {auto_augment_group}")
    n, c, h, w = images.shape
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
    mirror = (torch.rand(n, generator=generator) < 0.5).to(device)
    if not flip:
        mirror.zero_()
    cy = torch.randint(0, h, (n,), generator=generator).to(device)
    cx = torch.randint(0, w, (n,), generator=generator).to(device)
    out = torch.empty_like(images)
    fill = torch.tensor(_FILL[:c] if c == 3 else (0,) * c, dtype=images.dtype, device=device)
    ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
    channels = torch.arange(c, device=device).view(1, c, 1, 1)
    transform = POLICIES[auto_augment](fill.tolist()) if auto_augment else None
    auto_augment_seed = _draw_seed(generator) if transform is not None else 0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        padded = F.pad(images[s:e], (padding,) * 4)
        rows = (dy[s:e, None] + ar_h).view(-1, 1, h, 1)
        cols = dx[s:e, None] + ar_w
        cols = torch.where(mirror[s:e, None], cols.flip(1), cols).view(-1, 1, 1, w)
        batch = padded[torch.arange(e - s, device=device).view(-1, 1, 1, 1), channels, rows, cols]
        if transform is not None:
            with _global_rng(auto_augment_seed + s):
                batch = torch.cat([transform(g) for g in batch.split(auto_augment_group)])
        if cutout > 0:
            top = (cy[s:e] - cutout // 2).view(-1, 1, 1, 1)
            left = (cx[s:e] - cutout // 2).view(-1, 1, 1, 1)
            inside_y = (ar_h.view(1, 1, h, 1) >= top) & (ar_h.view(1, 1, h, 1) < top + cutout)
            inside_x = (ar_w.view(1, 1, 1, w) >= left) & (ar_w.view(1, 1, 1, w) < left + cutout)
            batch = torch.where(inside_y & inside_x, fill.view(1, c, 1, 1), batch)
        out[s:e] = batch
    return out


class TensorLoader:
    """Batches ``(normalised float32 images, labels)`` from uint8 tensors on one device.

    Args:
        images, labels: (N, C, H, W) uint8 and (N,) int64, on the device batches are used on.
        batch_size: items per batch (per rank).
        train: shuffle and augment each epoch (seeded by ``seed`` and the epoch), and drop the
            last partial batch when there is more than one batch.
        seed: seeds the order and augmentation of each epoch (with the epoch).
        rank, world_size: under DDP each rank takes ``rank::world_size`` of the epoch's order,
            cut to the same length on every rank.
        augment_args: keyword arguments of :func:`augment` (padding, flip, cutout, auto_augment).
        channels_last: give batches in channels-last memory format.
        mixup_alpha, cutmix_alpha: training batches are mixed by MixUp or CutMix with these Beta
            parameters (0: that one is off; both on: one of the two per batch, as in DeiT), and
            their labels become class probabilities (N, 10).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment_args: dict[str, Any] | None = None,
        channels_last: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.augment_args = augment_args or {}
        self.channels_last = channels_last
        self.epoch = 0
        self.per_rank = labels.numel() // world_size if train else labels.numel()
        device = images.device
        self.mean = torch.tensor(MEAN, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(STD, device=device).view(1, -1, 1, 1) * 255.0
        self.mix = _mixer(mixup_alpha, cutmix_alpha, len(CLASSES)) if train else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.per_rank, self.batch_size
        if self.train and n > b:
            return n // b
        return -(-n // b)

    def _epoch_data(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The epoch's images and labels in order, and the seed of its batch mixing."""
        if not self.train:
            return self.images, self.labels, 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.labels.numel(), generator=generator)
        order = order[self.rank :: self.world_size][: self.per_rank].to(self.images.device)
        images = augment(self.images[order], generator, **self.augment_args)
        mix_seed = _draw_seed(generator) if self.mix is not None else 0
        return images, self.labels[order], mix_seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels, mix_seed = self._epoch_data()
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x, y = images[sl].float().sub_(self.mean).div_(self.std), labels[sl]
            if self.mix is not None:
                with _global_rng(mix_seed + i):
                    x, y = self.mix(x, y)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


def _mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """MixUp, CutMix, one of the two at random, or None (alphas of 0 switch them off)."""
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not alpha >= 0:
            raise ValueError(f"{name} must be >= 0, got {alpha}")
    mixers = [
        kind(alpha=alpha, num_classes=num_classes)
        for kind, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
        if alpha > 0
    ]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


@register_task("cifar10")
class Cifar10(Task):
    """CIFAR-10 classification (see the module docstring).

    Args:
        options: data location, device, limits, channels-last.
        val_size: training images held out for validation (balanced over classes).
        label_smoothing: of the training cross-entropy.
        cutout: side of the cutout square in pixels (0: none).
        padding: of the random crop.
        auto_augment: an automatic augmentation policy (a name in :data:`POLICIES`) or None.
        mixup_alpha, cutmix_alpha: mix training batches (see :class:`TensorLoader`; 0: off).
        flip_tta: also report ``top1_flip``.
    """

    primary_metric = "top1"
    higher_is_better = True

    def __init__(
        self,
        options: TaskOptions,
        *,
        val_size: int = 5000,
        label_smoothing: float = 0.1,
        cutout: int = 0,
        padding: int = 4,
        auto_augment: str | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        flip_tta: bool = True,
    ) -> None:
        super().__init__(options)
        _check_policy(auto_augment)  # bad settings fail before the data loads
        _mixer(mixup_alpha, cutmix_alpha, len(CLASSES))
        self.val_size, self.label_smoothing = val_size, label_smoothing
        self.augment_args = {"padding": padding, "cutout": cutout}
        if auto_augment is not None:  # only when set: older runs' descriptions stay as they were
            self.augment_args["auto_augment"] = auto_augment
        self.mix_args = {"mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha}
        self.flip_tta = flip_tta
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        kwargs = {"download": options.download}
        seed = options.split_seed
        train = load_cifar10(options.data, "train", val_size=val_size, seed=seed, **kwargs)
        self._data["train"] = _subset(*train, options.train_limit, seed)
        if val_size > 0:
            val = load_cifar10(options.data, "val", val_size=val_size, seed=seed, **kwargs)
            self._data["val"] = _subset(*val, options.eval_limit, seed)
        test = load_cifar10(options.data, "test", **kwargs)
        self._data["test"] = _subset(*test, options.eval_limit, seed)
        device = self.device
        self._data = {k: (x.to(device), y.to(device)) for k, (x, y) in self._data.items()}
        self.splits = tuple(self._data)

    def loader(self, split, *, batch_size, train=False, seed=0, rank=0, world_size=1):
        self.check_split(split)
        images, labels = self._data[split]
        return TensorLoader(
            images,
            labels,
            batch_size,
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            augment_args=self.augment_args,
            channels_last=self.options.channels_last,
            **self.mix_args,
        )

    def loss(self, model: nn.Module, batch, *, distill: Distill | None = None) -> torch.Tensor:
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if distill is None:
            return loss
        with torch.no_grad():
            teacher = distill.teacher(images)
        t = distill.temperature
        kl = F.kl_div(
            F.log_softmax(logits.float() / t, -1),
            F.log_softmax(teacher.float() / t, -1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - distill.weight) * loss + distill.weight * t * t * kl

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        correct = correct_flip = 0
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        total = 0
        for images, labels in loader:
            logits = model(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
            if self.flip_tta:
                logits = logits + model(images.flip(3)).float()
                correct_flip += (logits.argmax(1) == labels).sum()
            total += labels.numel()
        metrics = {"top1": int(correct) / total, "loss": float(loss) / total}
        if self.flip_tta:
            metrics["top1_flip"] = int(correct_flip) / total
        return metrics

    def sensitivity(self, outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """KL(dense || selective) of the class distributions, per image."""
        return F.kl_div(
            F.log_softmax(outputs.float(), -1),
            F.log_softmax(reference.float(), -1),
            log_target=True,
            reduction="batchmean",
        )

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": 10}

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "data": self.options.data,
            "val_size": self.val_size,
            "split_seed": self.options.split_seed,
            "sizes": {k: int(v[1].numel()) for k, v in self._data.items()},
            "train_limit": self.options.train_limit,
            "eval_limit": self.options.eval_limit,
            "label_smoothing": self.label_smoothing,
            **self.augment_args,
            **{k: v for k, v in self.mix_args.items() if v},
        }


def _subset(
    images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced, seeded subset of ``limit`` items (everything if ``limit`` is None)."""
    if limit is None or limit >= labels.numel():
        return images, labels
    _, keep = split_indices(labels, limit, seed)
    return images[keep], labels[keep]
