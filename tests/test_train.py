"""The training core: task registry, schedules, checkpoints, resume, fine-tuning, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import selact
from selact.tasks.cifar10 import TensorLoader
from selact.train import (
    Task,
    TaskOptions,
    TrainConfig,
    create_task,
    fit,
    list_tasks,
    load_model,
    read_sidecar,
    register_task,
)
from selact.train.loop import _density_fraction, _lr

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason="no ../shared/data"
)


@register_task("toy")
class Toy(Task):
    """Random 8x8 images whose label is the brightest of 4 quadrants: learnable in seconds."""

    primary_metric = "top1"

    def __init__(self, options: TaskOptions, n: int = 256) -> None:
        super().__init__(options)
        g = torch.Generator().manual_seed(options.split_seed)
        self.data = {}
        for i, split in enumerate(("train", "val", "test")):
            images = torch.randint(0, 100, (n if i == 0 else n // 2, 3, 8, 8), generator=g)
            labels = torch.randint(0, 4, (images.shape[0],), generator=g)
            for q in range(4):
                r, c = divmod(q, 2)
                images[labels == q, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 120
            self.data[split] = (images.to(torch.uint8), labels)

    def loader(self, split, *, batch_size, train=False, seed=0, rank=0, world_size=1):
        images, labels = self.data[split]
        return TensorLoader(
            images, labels, batch_size, train=train, seed=seed, rank=rank,
            world_size=world_size, augment_args={"padding": 1},
        )  # fmt: skip

    def loss(self, model, batch, *, distill=None):
        images, labels = batch
        loss = nn.functional.cross_entropy(model(images), labels)
        if distill is not None:
            with torch.no_grad():
                teacher = distill.teacher(images)
            loss = loss + distill.weight * nn.functional.mse_loss(model(images), teacher)
        return loss

    @torch.no_grad()
    def evaluate(self, model, loader):
        correct = total = 0
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += labels.numel()
        return {"top1": correct / total}

    def model_kwargs(self):
        return {}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


CONFIG = TrainConfig(epochs=3, batch_size=32, lr=0.1, warmup=0.2, eval_batch_size=64)


def test_create_task_names_an_unknown_setting():
    with pytest.raises(ValueError, match=r"task 'toy' has no setting colour, m; its settings: n"):
        create_task("toy", colour=1, m=2)


def test_registry_lists_tasks_and_names_unknown_ones():
    assert {"cifar10", "toy"} <= set(list_tasks())
    with pytest.raises(KeyError, match="cifar10"):
        create_task("no-such-task")


def test_schedules():
    c = TrainConfig(lr=1.0, warmup=0.2, warmup_start=0.1, schedule="linear")
    assert _lr(c, 0.0) == pytest.approx(0.1)
    assert _lr(c, 0.2) == pytest.approx(1.0)
    assert _lr(c, 0.6) == pytest.approx(0.5)
    assert _lr(c, 1.0) == pytest.approx(0.0)
    assert _lr(c.replace(schedule="cosine"), 0.6) == pytest.approx(0.5)
    d = TrainConfig(density_schedule="linear", density_warmup=0.5)
    assert [_density_fraction(d, p) for p in (0.0, 0.25, 0.5, 0.9)] == [0.0, 0.5, 1.0, 1.0]
    assert _density_fraction(d.replace(density_schedule="constant"), 0.0) == 1.0
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_fit_learns_and_writes_checkpoints(tmp_path):
    task = create_task("toy")
    result = fit(task, _net(), CONFIG.replace(epochs=4, ema=0.9), run_dir=tmp_path, progress=False)
    assert result.metrics["test"]["top1"] > 0.6
    assert len(result.history) == 4 and "val" in result.history[-1]
    side = read_sidecar(tmp_path / "model.safetensors")
    assert side["config"]["epochs"] == 4 and side["seed"] == 0 and side["ema"]
    assert "ema_chosen" in side and all(p.requires_grad for p in result.model.parameters())
    assert side["metrics"]["test"]["top1"] == result.metrics["test"]["top1"]
    assert side["sha256"] == selact.train.file_sha256(tmp_path / "model.safetensors")
    assert side["commit"] == selact._provenance.commit()  # the code that trained it
    loaded, _ = load_model(_net(), tmp_path / "model.safetensors")
    for a, b in zip(loaded.state_dict().values(), result.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary file


class _Stop(Exception):
    pass


def test_cuda_graph_is_a_no_op_off_cuda():
    """``cuda_graph`` asks for CUDA graphs where they apply; on the CPU training is unchanged."""
    task = create_task("toy")
    config = CONFIG.replace(epochs=1, eval_every=0)
    a = fit(task, _net(), config.replace(cuda_graph=True), progress=False)
    b = fit(task, _net(), config, progress=False)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    task = create_task("toy")
    straight = fit(task, _net(), CONFIG, run_dir=tmp_path / "a", progress=False)

    def interrupt(epoch, record):
        if epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit(task, _net(), CONFIG, run_dir=tmp_path / "b", progress=False, on_epoch_end=interrupt)
    assert json.loads((tmp_path / "b" / "last.json").read_text())["epoch"] == 2
    resumed = fit(task, _net(), CONFIG, run_dir=tmp_path / "b", progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another config"):
        fit(task, _net(), CONFIG.replace(lr=0.2), run_dir=tmp_path / "b", progress=False)


def test_time_limit_stops_early_and_ends_the_schedule(tmp_path):
    task = create_task("toy")
    result = fit(
        task, _net(), CONFIG.replace(epochs=1000, time_limit=1.0), run_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    assert 0 < result.info["epochs_done"] < 1000
    assert result.history[-1]["lr"] < 0.3 * CONFIG.lr  # the decay ran (the last step is near 1)


def test_time_limit_counts_evaluations_and_holds_back_the_final_one(monkeypatch):
    """The limit is the run's wall time: evaluations leave fewer seconds for training, and the
    time of the final evaluation (val and test here) and of the caller's evaluations after fit
    is held back. Time is simulated: each clock reading advances it 1 ms, each evaluation
    ``pause`` seconds (no sleeping, no dependence on the machine's load)."""
    import selact.train.loop as loop

    pause, limit = 0.5, 4.0
    now = [0.0]

    def clock() -> float:
        now[0] += 1e-3
        return now[0]

    real = loop.evaluate

    def slow_evaluate(*args, **kwargs):
        now[0] += pause
        return real(*args, **kwargs)

    monkeypatch.setattr(loop.time, "perf_counter", clock)
    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    task = create_task("toy")
    config = CONFIG.replace(epochs=10_000, time_limit=limit, eval_every=1)
    start = now[0]
    result = fit(task, _net(), config, progress=False)
    evaluations = sum(config.eval_split in h for h in result.history)
    assert 0 < result.info["epochs_done"] < config.epochs
    assert sum(h["seconds"] for h in result.history) + pause * evaluations <= limit
    assert now[0] - start <= limit + 0.05  # the final val and test (1 s) were foreseen
    # Without periodic evaluations the first epoch's evaluation times the final one; the
    # caller's own evaluations after fit (evaluations_after) are held back too.
    config = config.replace(eval_every=0)
    start = now[0]
    result = fit(task, _net(), config, progress=False, evaluations_after=2)
    assert [config.eval_split in h for h in result.history][:2] == [True, False]
    for _ in range(2):
        for split in ("val", "test"):
            loop.evaluate(task, result.model, split, config)
    assert now[0] - start <= limit + 0.05


def test_keep_best_ends_with_the_best_periodic_evaluation(monkeypatch):
    """Dense training with ``keep_best`` returns the weights whose val score was best (epoch 2
    of 4 here), not the last ones; without it, the last."""
    import selact.train.loop as loop

    real = loop.evaluate
    periodic = iter([0.5, 0.9, 0.6, 0.4] * 2)  # val top-1 of the periodic evaluations
    in_loop = [True]

    def scripted(task, model, split, config, **kwargs):
        result = real(task, model, split, config, **kwargs)
        if split == "val" and in_loop[0]:
            result["top1"] = next(periodic)
        return result

    monkeypatch.setattr(loop, "evaluate", scripted)
    states = {}

    def snapshot(epoch, record):
        states[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
        in_loop[0] = epoch < 4

    config = CONFIG.replace(epochs=4, eval_every=1)
    net = _net()
    result = fit(create_task("toy"), net, config.replace(keep_best=True), progress=False,
                 on_epoch_end=snapshot)  # fmt: skip
    assert result.info["best_epoch"] == 2 and result.info["val_best_vs_last"] == [0.9, 0.4]
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, states[2][name], rtol=0, atol=0)
    in_loop[0] = True
    net = _net()
    result = fit(create_task("toy"), net, config, progress=False, on_epoch_end=snapshot)
    assert "best_epoch" not in result.info
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, states[4][name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep_best"):
        CONFIG.replace(keep_best=True, eval_split="test")


def test_keep_best_survives_a_resume(monkeypatch, tmp_path, caplog):
    """The best weights are written with the training state: a run interrupted after its best
    evaluation (epoch 2) and resumed still ends with them; a best file that the state does not
    name (another run's) is not used."""
    import selact.train.loop as loop

    real = loop.evaluate
    scores = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.4}  # val top-1 of the periodic evaluation per epoch
    now = {"epoch": 1, "stop": 0}

    def scripted(task, model, split, config, **kwargs):
        result = real(task, model, split, config, **kwargs)
        if split == "val" and now["epoch"] in scores:
            result["top1"] = scores[now["epoch"]]
        return result

    def snapshot(epoch, record):
        states[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
        now["epoch"] = epoch + 1
        if epoch == now["stop"]:
            raise _Stop

    def run(folder, first, stop=0):  # epochs from ``first`` on, interrupted after ``stop``
        nonlocal net
        now.update(epoch=first, stop=stop)
        net = _net()
        return fit(task, net, config, run_dir=folder, progress=False, on_epoch_end=snapshot)

    monkeypatch.setattr(loop, "evaluate", scripted)
    config = CONFIG.replace(epochs=4, eval_every=1, keep_best=True)
    task, states, net = create_task("toy"), {}, None
    with pytest.raises(_Stop):
        run(tmp_path / "a", 1, stop=3)
    assert json.loads((tmp_path / "a" / "best.json").read_text())["best"] == {
        "epoch": 2, "score": 0.9,
    }  # fmt: skip
    result = run(tmp_path / "a", 4)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.info["best_epoch"] == 2 and result.info["val_best_vs_last"] == [0.9, 0.4]
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, states[2][name], rtol=0, atol=0)

    scores[2] = 0.3  # another run: its best is epoch 3 (0.6)
    states.clear()
    with pytest.raises(_Stop):
        run(tmp_path / "b", 1, stop=3)
    for name in ("best.safetensors", "best.json"):  # the first run's file, 0.9 at epoch 2
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    with caplog.at_level("WARNING", logger=loop.log.name):
        result = run(tmp_path / "b", 4)
    assert "not the best weights the training state names" in caplog.text
    assert "best_epoch" not in result.info  # epoch 4 (0.4) was the best since the resume
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, states[4][name], rtol=0, atol=0)


def test_checkpoint_seconds_spaces_the_training_states(tmp_path):
    task = create_task("toy")
    seen = []

    def look(epoch, record):
        seen.append((tmp_path / "last.json").is_file())

    fit(task, _net(), CONFIG.replace(epochs=4, checkpoint_seconds=3600.0), run_dir=tmp_path,
        progress=False, on_epoch_end=look)  # fmt: skip
    assert seen == [False, False, False, True]  # only the last epoch's state, within an hour
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 4
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        CONFIG.replace(checkpoint_seconds=-1.0)


def test_recorded_config_matches_with_fields_added_since():
    config = TrainConfig(epochs=3, lr=0.1)
    recorded = config.to_dict()
    assert config.matches(recorded)
    older = {k: v for k, v in recorded.items() if k != "checkpoint_seconds"}  # default 0
    assert config.matches(older)
    assert not config.replace(checkpoint_seconds=60.0).matches(older)
    assert not config.matches({**recorded, "epochs": 4})
    assert not config.matches({**recorded, "unknown": 1})
    assert not config.matches(None)


def test_mask_aware_finetuning_keeps_configs_and_distils(tmp_path):
    task = create_task("toy")
    dense = fit(task, _net(), CONFIG, progress=False).model
    model = selact.sparsify(
        _copy(dense), strategy="sapi", density=0.3, overrides={"2": {"density": 0.5}}
    )
    before = {m.layer_name: m.config for m in selact.train.selective_layers(model)}
    seen = []
    layer = model.get_submodule("2")
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.config.density))
    config = CONFIG.replace(epochs=2, density_schedule="linear", density_warmup=0.5, distill=0.5)
    result = fit(task, model, config, teacher=dense, run_dir=tmp_path, progress=False)
    handle.remove()
    assert {m.layer_name: m.config for m in selact.train.selective_layers(model)} == before
    assert seen[0] == pytest.approx(1.0) and min(seen) == pytest.approx(0.5)
    assert all(a >= b - 1e-9 for a, b in zip(seen, seen[1:], strict=False))
    reloaded, side = load_model(_net(), tmp_path / "model.safetensors")
    assert reloaded.get_submodule("2").config.density == 0.5
    selact.reset_stats(result.model)
    x = task.data["test"][0][:16].float()
    result.model(x)
    assert selact.stats(result.model).layers["2"].density == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="teacher"):
        fit(task, _net(), CONFIG.replace(distill=0.5), progress=False)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_selective_layers_run_under_autocast():
    model = selact.sparsify(_net().eval(), strategy="sapw", density=0.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert model.get_submodule("2").weight.grad is not None
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    selact.sparsify(mha, filter_fn=lambda m, n: n == "", density=0.5, key_density=0.5)
    t = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mha(t, t, t)[0].dtype == torch.bfloat16


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@needs_data
def test_ddp_with_gloo_on_two_cpu_processes(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "selact-cache"  # shared with the other data tests
    env = {**os.environ, "SELACT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), "-m", "selact", "train", "--task", "cifar10",
        "--model", "small_cnn", "--smoke", "--data", str(SHARED_DATA), "--device", "cpu",
        "--run-dir", str(tmp_path / "run"), "--no-progress", "--epochs", "10000",
        "--time-limit", "8",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    side = read_sidecar(tmp_path / "run" / "model.safetensors")
    assert side["world_size"] == 2
    assert 0 < side["epochs_done"] < 10000  # both ranks stopped at rank 0's step
    assert math.isfinite(side["metrics"]["test"]["top1"])
