"""The CIFAR-10 task: on-device augmentation, seeded epochs, DDP shards, splits and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from selact.data import split_indices
from selact.tasks.cifar10 import TensorLoader, augment
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
    with pytest.raises(ValueError, match="no split"):
        task.loader("holdout", batch_size=8)
    # the validation images are held out of training (class-balanced, fixed by seed)
    labels = torch.arange(50_000) % 10
    train, val = split_indices(labels, 5000, 0)
    assert len(val) == 5000 and not set(train.tolist()) & set(val.tolist())
