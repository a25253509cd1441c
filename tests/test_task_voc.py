"""The VOC task: seeded loaders, evaluation in original pixels, and a smoke training run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selact.models import create_model
from selact.train import TaskOptions, TrainConfig, create_task, fit, list_tasks
from tests import voc_tree


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELACT_DATA", raising=False)


@pytest.fixture
def task(tmp_path):
    tree = voc_tree.make_tree(tmp_path / "voc", n_train=8, n_val=4)
    return create_task("voc", TaskOptions(data=str(tree)), preset="smoke")


def _batches(loader):
    return [(x.clone(), [t["boxes"].clone() for t in ts]) for x, ts in loader]


def test_registered_and_splits(task):
    assert "voc" in list_tasks()
    assert task.splits == ("train", "val") and task.primary_metric == "map50"
    assert task.model_kwargs()["image_size"] == 64 and task.model_kwargs()["num_classes"] == 20
    with pytest.raises(ValueError, match="no split 'test'"):
        task.loader("test", batch_size=2)
    with pytest.raises(ValueError, match="unknown preset"):
        create_task("voc", task.options, preset="huge")


def test_train_loader_is_seeded_by_epoch(task):
    loader = task.loader("train", batch_size=3, train=True, seed=1)
    assert len(loader) == 2  # 8 images, last partial batch dropped
    loader.set_epoch(0)
    first = _batches(loader)
    torch.rand(5)  # the global RNG does not matter
    again = _batches(loader)
    for (x, b), (y, c) in zip(first, again, strict=True):
        assert torch.equal(x, y) and all(torch.equal(p, q) for p, q in zip(b, c, strict=True))
    loader.set_epoch(1)
    assert not torch.equal(_batches(loader)[0][0], first[0][0])
    halves = [
        task.loader("train", batch_size=2, train=True, seed=1, rank=r, world_size=2) for r in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1]) == 2


def test_eval_loader_in_order(task):
    loader = task.loader("val", batch_size=1000)
    assert loader.batch_size == 64 and len(loader) == 1
    _, targets = next(iter(loader))
    assert [t["index"] for t in targets] == [0, 1, 2, 3]


class _Oracle(nn.Module):
    """Returns the letterboxed truth of each batch, in the loader's order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return self.outputs.pop(0)


def test_evaluate_maps_back_to_original_pixels(task):
    loader = task.loader("val", batch_size=3)
    outputs = [
        [
            {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            for t in targets
        ]
        for _, targets in loader
    ]
    metrics = task.evaluate(_Oracle(outputs), loader)
    assert metrics["map50"] == pytest.approx(1.0) and metrics["map50_07"] == pytest.approx(1.0)
    assert metrics["coco_map50"] == pytest.approx(1.0)
    saved = task.last_predictions
    assert len(saved["predictions"]) == 4 and len(saved["classes"]) == 20
    for p, t in zip(saved["predictions"], saved["targets"], strict=True):
        torch.testing.assert_close(p["boxes"], t["boxes"], atol=1.5, rtol=0)


def test_head_outputs_for_sensitivity(task):
    model = create_model("det", **task.model_kwargs()).eval()
    batch = next(iter(task.loader("val", batch_size=2)))
    with torch.no_grad():
        out = task.forward(model, batch)
    assert set(out) == {"cls_logits", "bbox_regression", "bbox_ctrness"}
    assert float(task.sensitivity(out, out)) == 0.0


def test_smoke_fit_and_resume(task, tmp_path):
    torch.manual_seed(0)
    model = create_model("det", **task.model_kwargs())
    config = TrainConfig(
        epochs=1, batch_size=4, optimizer="adamw", lr=1e-3, eval_batch_size=8, warmup=0.0
    )
    result = fit(task, model, config, run_dir=tmp_path / "run", progress=False)
    assert 0.0 <= result.metrics["val"]["map50"] <= 1.0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    with pytest.raises(NotImplementedError, match="distillation"):
        task.loss(model, next(iter(task.loader("train", batch_size=2))), distill=object())


def test_workers_give_the_same_epoch(task):
    serial = task.loader("train", batch_size=4, train=True, seed=3)
    task.num_workers = 1
    parallel = task.loader("train", batch_size=4, train=True, seed=3)
    for (x, b), (y, c) in zip(_batches(serial), _batches(parallel), strict=True):
        assert torch.equal(x, y) and all(torch.equal(p, q) for p, q in zip(b, c, strict=True))
