"""The CIFAR-10 task: on-device augmentation, seeded epochs, DDP shards, splits and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from selact.data import split_indices
from selact.tasks.cifar10 import POLICIES, TensorLoader, augment
from selact.train import TaskOptions, create_task

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _images(n=6):
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)


def test_augment_identity_flip_and_cutout():
    x = _images()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, g, padding=0, flip=False), x)
    flipped = augment(x, torch.Generator().manual_seed(1), padding=0)
    for a, b in zip(flipped, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    cut = augment(x, torch.Generator().manual_seed(2), padding=0, flip=False, cutout=4)
    changed = (cut != x).any(0)
    assert changed.any()
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8).view(3, 1, 1)
    assert ((cut == fill) | (cut == x)).all()


def test_augment_crop_is_a_shift_and_seeded():
    x = _images(32)
    a = augment(x, torch.Generator().manual_seed(3), padding=2, flip=False)
    b = augment(x, torch.Generator().manual_seed(3), padding=2, flip=False, chunk=5)
    assert torch.equal(a, b)
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for img, src in zip(a, padded, strict=True):
        assert any(
            torch.equal(img, src[:, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5)
        )


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_augment_policies_are_seeded_and_leave_the_global_rng_alone(policy):
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    state = torch.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(4), auto_augment=policy, auto_augment_group=8)
    assert torch.equal(torch.get_rng_state(), state)  # torchvision's draws came from our seed
    b = augment(x, torch.Generator().manual_seed(4), auto_augment=policy, auto_augment_group=8)
    plain = augment(x, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, plain)
    other = augment(x, torch.Generator().manual_seed(5), auto_augment=policy, auto_augment_group=8)
    assert not torch.equal(a, other)


def test_augment_rejects_unknown_policies():
    with pytest.raises(ValueError, match="auto_augment must be one of"):
        augment(_images(), torch.Generator(), auto_augment="autoaug")
    with pytest.raises(ValueError, match="auto_augment_group"):
        augment(_images(), torch.Generator(), auto_augment="randaugment", auto_augment_group=0)


def _mixed_batch(**alphas):
    images, labels = _images(10), torch.arange(10)  # one image per class: weights are readable
    loader = TensorLoader(images, labels, 10, train=True, seed=2, augment_args={"padding": 0},
                          **alphas)  # fmt: skip
    x, y = next(iter(loader))
    plain = TensorLoader(images, labels, 10, train=True, seed=2, augment_args={"padding": 0})
    x0, y0 = next(iter(plain))  # the same epoch before mixing (the order and flips match)
    assert y.shape == (10, 10) and torch.allclose(y.sum(1), torch.ones(10))
    own = y[torch.arange(10), y0]
    other = y[torch.arange(10), y0.roll(1)]  # each image is mixed with the one before it
    assert torch.allclose(own + other, torch.ones(10))
    assert torch.equal(y, next(iter(loader))[1])  # seeded
    return x, x0, own[0]


def test_mixup_mixes_images_and_labels_alike():
    x, x0, lam = _mixed_batch(mixup_alpha=0.4)
    assert torch.allclose(x, lam * x0 + (1 - lam) * x0.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_a_box_of_the_label_weight():
    x, x0, lam = _mixed_batch(cutmix_alpha=1.0)
    from_self = (x == x0).all(1)  # per pixel, over channels
    assert ((x == x0) | (x == x0.roll(1, 0))).all()
    assert from_self.float().mean() == pytest.approx(float(lam), abs=1 / 64)


def test_mixing_is_for_training_only_and_checks_alphas():
    images, labels = _images(10), torch.arange(10)
    _, y = next(iter(TensorLoader(images, labels, 10, mixup_alpha=0.8, cutmix_alpha=1.0)))
    assert torch.equal(y, labels)
    with pytest.raises(ValueError, match="cutmix_alpha must be >= 0"):
        TensorLoader(images, labels, 10, train=True, cutmix_alpha=-1.0)


def test_loader_epochs_and_ddp_shards():
    images, labels = _images(50), torch.arange(50)
    loader = TensorLoader(images, labels, 8, train=True, seed=1)
    assert len(loader) == 6
    loader.set_epoch(0)
    first = torch.cat([y for _, y in loader])
    again = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    other = torch.cat([y for _, y in loader])
    assert torch.equal(first, again) and not torch.equal(first, other)
    shards = [
        torch.cat([y for _, y in TensorLoader(images, labels, 5, train=True, seed=1, rank=r,
                                              world_size=2)])
        for r in range(2)
    ]  # fmt: skip
    assert len(shards[0]) == len(shards[1]) == 25
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    x, _ = next(iter(TensorLoader(images, labels, 50)))
    assert x.dtype == torch.float32 and x.shape == (50, 3, 8, 8)


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason="no data")
def test_task_splits_and_metrics(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path_factory.getbasetemp() / "selact-cache"))
    task = create_task(
        "cifar10", TaskOptions(data=str(SHARED_DATA), train_limit=200, eval_limit=100)
    )
    assert task.describe()["sizes"] == {"train": 200, "val": 100, "test": 100}
    assert task.splits == ("train", "val", "test")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    loader = task.loader("test", batch_size=64)
    metrics = task.evaluate(model, loader)
    assert set(metrics) == {"top1", "top1_flip", "loss"} and 0 <= metrics["top1"] <= 1
    batch = next(iter(task.loader("train", batch_size=32, train=True)))
    assert torch.isfinite(task.loss(model, batch))
    strong = create_task(
        "cifar10",
        TaskOptions(data=str(SHARED_DATA), train_limit=200, eval_limit=100),
        auto_augment="trivialaugment",
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
    )
    images, soft = next(iter(strong.loader("train", batch_size=32, train=True)))
    assert soft.shape == (32, 10) and torch.isfinite(strong.loss(model, (images, soft)))
    assert strong.describe()["auto_augment"] == "trivialaugment"
    assert "auto_augment" not in task.describe()  # older runs' descriptions are unchanged
    with pytest.raises(ValueError, match="auto_augment must be one of"):
        create_task("cifar10", TaskOptions(data="/nonexistent"), auto_augment="ta_wide")
    with pytest.raises(ValueError, match="no split"):
        task.loader("holdout", batch_size=8)
    # the validation images are held out of training (class-balanced, fixed by seed)
    labels = torch.arange(50_000) % 10
    train, val = split_indices(labels, 5000, 0)
    assert len(val) == 5000 and not set(train.tolist()) & set(val.tolist())
