"""Training recipes and sweep plans per model, at each scale.

A :class:`Recipe` holds the dense training and fine-tuning configs of one model, the task's own
settings (label smoothing, cutout; fine-tuning may change some) and the sweep's plan: the
executed/dense MAC targets, the frontier target of the issue's goal, and the strategy fine-tuned
first. Scales:

- ``full``: the GPU recipes (bf16, batch 512). Dense epochs are a maximum: with a time limit the
  schedule is stretched over the time given (see :class:`selact.train.TrainConfig`).
- ``cpu``: the same recipes cut to what 2 CPU cores do in an hour or two: at most 30 dense
  epochs at batch 128 (stretched or cut to a time budget), one fine-tuning epoch.
- ``smoke``: a few hundred images and one epoch: the whole pipeline in seconds (tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from selact.train.loop import TrainConfig

__all__ = ["Recipe", "SCALES", "recipe"]

SCALES = ("smoke", "cpu", "full")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything model-specific that a sweep needs (see the module docstring)."""

    model: str
    dense: TrainConfig
    finetune: TrainConfig
    task_args: dict[str, Any]  # the task's settings (augmentation, label smoothing)
    targets: tuple[float, ...]  # executed/dense MAC fractions evaluated without fine-tuning
    frontier: float  # the goal: within 0.3 pt (0.5 for the ViT) of dense at this fraction
    lower: float  # a second, harder fine-tuning target
    strategy: str  # fine-tuned first ("sapi" for CNNs, "sapw" for the ViT)
    other: str  # the other AMU strategy
    coarse: str = "channel"  # the coarser granularity compared with "element"
    train_limit: int | None = None
    eval_limit: int | None = None
    calib_images: int = 1000  # validation images the budget searches measure on
    calib_batch: int = 500
    search_steps: int = 30  # budget search: about this many greedy steps to the lowest target
    # budget search: every layer's cut measured every this many steps, lazy steps between
    # (budget_search's refresh; on the H100 ResNet-20, 5 took 3.4x fewer passes than 1 and
    # reached the same or higher val top-1 at each target: docs/results.md)
    search_refresh: int = 5
    # task settings of fine-tuning over ``task_args`` (the dense training's)
    finetune_task_args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def finetune_settings(self) -> dict[str, Any]:
        """The task's settings for fine-tuning: ``task_args`` with ``finetune_task_args`` over."""
        return {**self.task_args, **self.finetune_task_args}

    def all_targets(self) -> tuple[float, ...]:
        """The evaluated targets and the fine-tuning ones, highest first."""
        return tuple(sorted({*self.targets, self.frontier, self.lower}, reverse=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# One-cycle-like SGD for the CNNs: linear warmup over 15 % of the run, linear decay to zero;
# label smoothing 0.1. The reference plain recipe (no smoothing, 100 epochs) gave ResNet-20
# 88.3 % and VGG-16 89.8 % (40 epochs) on the JPEG copy.
_CNN_DENSE = TrainConfig(
    epochs=200,
    batch_size=512,
    optimizer="sgd",
    lr=0.4,  # 0.1 per 128 images, scaled linearly to batch 512
    weight_decay=5e-4,
    schedule="linear",
    warmup=0.15,
    eval_every=10,  # val accuracy every 10 epochs: enough to watch, cheap on the budget
    ema=0.999,  # per step, updated every 4 steps; kept only if better on val
    cuda_graph=True,  # on a GPU: forward and backward replayed as CUDA graphs (no effect on CPU)
    checkpoint_seconds=60.0,  # a training state at most once a minute: on an H100 VGG-16's
    # epoch took 0.47 s and writing its state after every epoch another 0.5 s
    keep_best=True,  # the best of the val evaluations: ResNet-20 peaked at epoch 160 of 200
)
# Mask-aware fine-tuning: a tenth of the peak rate, cosine to zero, distillation from the dense
# model's logits (weight 0.5, T = 4), the density falling linearly from 1.0 to its target over
# the first 30 % of the steps; the sweep evaluates after fine-tuning.
_MASK_AWARE = {
    "epochs": 10,
    "schedule": "cosine",
    "warmup": 0.1,
    "density_schedule": "linear",
    "density_warmup": 0.3,
    "distill": 0.5,
    "temperature": 4.0,
    "eval_every": 0,
    "ema": 0.0,
    "cuda_graph": False,  # the density schedule and masks change every step
    "keep_best": False,  # no periodic evaluations (and densities above the target early on)
}
_CNN_FINETUNE = _CNN_DENSE.replace(lr=0.04, **_MASK_AWARE)
_VIT_DENSE = TrainConfig(
    epochs=200,
    batch_size=512,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.05,
    schedule="cosine",
    warmup=0.1,
    grad_clip=1.0,
    eval_every=10,
    ema=0.999,
    cuda_graph=True,
    checkpoint_seconds=60.0,
    keep_best=True,  # the ViT peaked at epoch 150 of 200 on an H100
)
_VIT_FINETUNE = _VIT_DENSE.replace(lr=2e-4, **_MASK_AWARE)

_FULL = {
    "resnet20": Recipe(
        model="resnet20",
        dense=_CNN_DENSE,
        finetune=_CNN_FINETUNE,
        # cutout 8 since 2026-11-27: without it the H100 run 6 overfitted the end of its
        # schedule (val loss 0.382 -> 0.424 over the last 40 epochs while train loss fell)
        task_args={"label_smoothing": 0.1, "cutout": 8},
        targets=(0.5, 0.4, 1 / 3, 0.25, 0.2),
        frontier=1 / 3,
        lower=0.25,
        strategy="sapi",
        other="sapw",
    ),
    "vgg16": Recipe(
        model="vgg16",
        dense=_CNN_DENSE.replace(lr=0.2),  # VGG without residuals: half the rate is stabler
        finetune=_CNN_FINETUNE.replace(lr=0.02, epochs=8),
        # TrivialAugment since 2026-11-27: with cutout alone val peaked at epoch 180 of 200 and
        # fell after (H100 run 7: 90.77 % test); with it 91.25 % (run 8)
        task_args={"label_smoothing": 0.1, "cutout": 8, "auto_augment": "trivialaugment"},
        targets=(0.5, 0.4, 1 / 3, 0.25, 0.2),
        frontier=0.25,
        lower=0.2,
        strategy="sapi",
        other="sapw",
    ),
    "vit": Recipe(
        model="vit",
        dense=_VIT_DENSE,
        finetune=_VIT_FINETUNE.replace(epochs=8),
        # Strong augmentation, as small ViTs on CIFAR need (DeiT, Compact Transformers): with
        # crop, flip and cutout alone the H100 run 6 ended at the label-smoothed loss floor
        # (train loss 0.51) while val stalled (80.8 % at epoch 50, 81.9 % at 150): memorised.
        task_args={
            "label_smoothing": 0.1,
            "cutout": 0,  # CutMix cuts instead
            "auto_augment": "trivialaugment",
            "mixup_alpha": 0.8,
            "cutmix_alpha": 1.0,
        },
        # Fine-tuning with crop and flip only (since 2026-11-28): on run 7's ViT at 1/2 of dense
        # MACs (SAPW, 8 epochs) val fell 1.05 pt (3 seeds) with MixUp/CutMix and TrivialAugment,
        # 0.66 with TrivialAugment alone (one seed), 0.27 with neither (3 seeds; docs/results.md):
        # the masked model recovers on the clean images (why augmentation slows it: untested).
        finetune_task_args={"auto_augment": None, "mixup_alpha": 0.0, "cutmix_alpha": 0.0},
        targets=(0.75, 0.6, 0.5, 0.4, 0.3),
        frontier=0.5,
        lower=0.4,
        strategy="sapw",
        other="sapi",
    ),
}


def recipe(model: str, scale: str = "full") -> Recipe:
    """The recipe of ``model`` at ``scale``; models without their own (resnet56, torchvision or
    timm models) use ResNet-20's."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    base = _FULL.get(model, dataclasses.replace(_FULL["resnet20"], model=model))
    if scale == "full":
        return base
    if scale == "cpu":  # ResNet-20: about 1.5 min per epoch on 2 CPU cores (DESIGN.md section 5)
        return dataclasses.replace(
            base,
            dense=base.dense.replace(epochs=30, batch_size=128, lr=base.dense.lr / 4, eval_every=5),
            finetune=base.finetune.replace(epochs=1, batch_size=128, lr=base.finetune.lr / 4),
            calib_images=500,
            calib_batch=250,
        )
    small = {"batch_size": 64, "eval_every": 0, "eval_batch_size": 256}
    return dataclasses.replace(
        base,
        dense=base.dense.replace(epochs=1, lr=base.dense.lr / 4, **small),
        finetune=base.finetune.replace(epochs=1, **small),
        targets=(1.0, 0.5, 0.3),
        train_limit=256,
        eval_limit=128,
        calib_images=64,
        calib_batch=64,
        search_steps=6,
    )
