"""``selact sweep --smoke`` end to end: rows, budgets checked by an independent MAC count,
density 1.0 equal to dense, the report, and no smoke output under results/."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import selact
from selact.cli import app
from selact.experiments.recipes import recipe
from selact.experiments.report import frontier, markdown, summarize
from selact.experiments.sweep import (
    Finetune,
    SweepConfig,
    _Child,
    _child_args,
    _dense_epoch_seconds,
    _jobs,
    _merge,
    _Rows,
    calibration_batches,
    done_jobs,
    merge_shard_files,
    parse_shard,
    plan,
    read_rows,
    run_sweep,
    shard_jobs,
    sweep_recipe,
)
from selact.models import create_model
from selact.train import TaskOptions, create_task, load_model
from tests.mac_count import independent_fraction

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason="no ../shared/data"
)


@pytest.fixture(scope="module")
def sweep_rows(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "selact-cache"  # shared with the other data tests
    out = tmp_path_factory.mktemp("sweep") / "small_cnn.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELACT_CACHE", str(cache))
        args = [
            "sweep", "--task", "cifar10", "--model", "small_cnn", "--smoke", "--device", "cpu",
            "--data", str(SHARED_DATA), "--out", str(out), "--run-dir", str(out.parent / "run"),
            "--max-finetunes", "2", "--png", str(out.parent / "plot.png"),
            "--finetune-task-arg", "cutout=4",  # the recipe's dense training: cutout 8
        ]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        yield json.loads(out.read_text()), out, cache


@pytest.mark.slow
@needs_data
def test_rows(sweep_rows):
    rows, out, _ = sweep_rows
    kinds = {(r["strategy"], r["granularity"], r["allocation"], r["finetune_epochs"] > 0)
             for r in rows}  # fmt: skip
    assert {
        ("dense", None, None, False),
        ("zero_skip", None, None, False),
        ("sapi", "element", "global", False),
        ("sapi", "element", "uniform", False),
        ("random", "element", "uniform", False),
        ("sapw", "channel", "uniform", False),
        ("sapi", "element", "global", True),
        ("dense", None, None, True),
    } <= kinds
    fields = {
        "model", "strategy", "granularity", "allocation", "target_density",
        "executed_mac_fraction", "zero_skip_mac_fraction", "top1", "val_top1",
        "finetune_epochs", "seed", "scale", "hardware", "command", "checkpoint_sha256",
        "commit", "date",
    }  # fmt: skip
    for row in rows:
        assert fields <= set(row), fields - set(row)
        assert row["scale"] == "smoke" and 0.0 <= row["top1"] <= 1.0
        assert row["task_args"]["cutout"] == (4 if row["finetune_epochs"] else 8)
    # fine-tuning ran with its own settings (its checkpoint's record), measured as every row is
    tuned = next(r for r in rows if r["finetune_epochs"])
    record = Path(tuned["dense_checkpoint"]).parent.parent / "ft-dense-s0" / "model.json"
    assert json.loads(record.read_text())["data"]["cutout"] == 4
    assert (out.parent / "plot.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_data
def test_budgets_match_an_independent_count(sweep_rows):
    rows, _, cache = sweep_rows
    rec = recipe("small_cnn", "smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELACT_CACHE", str(cache))
        task = create_task(
            "cifar10",
            TaskOptions(data=str(SHARED_DATA), train_limit=rec.train_limit,
                        eval_limit=rec.eval_limit),
            **rec.task_args,
        )  # fmt: skip
    calib = calibration_batches(task, rec)
    checked = 0
    for row in rows:
        if row["allocation"] is None or row["finetune_epochs"]:
            continue
        dense, _ = load_model(create_model("small_cnn"), row["dense_checkpoint"])
        config = selact.SelectiveConfig(
            strategy=row["strategy"], granularity=row["granularity"], backend="reference"
        )
        overrides = {name: {"density": d} for name, d in row["densities"].items()}
        model = selact.sparsify(dense.eval(), config, overrides=overrides)
        torch.manual_seed(0)
        fraction = independent_fraction(model, calib, create_model("small_cnn"))
        if row["strategy"] != "random":  # random masks are redrawn on every call
            assert fraction == pytest.approx(row["calib_executed_mac_fraction"], abs=1e-9)
        assert fraction <= row["target_mac_fraction"] + 0.01
        assert row["calib_executed_mac_fraction"] <= row["target_mac_fraction"] + 1e-9
        checked += 1
    assert checked >= 15


@pytest.mark.slow
@needs_data
def test_density_one_is_dense_and_report(sweep_rows):
    rows, _, _ = sweep_rows
    dense = next(r for r in rows if r["strategy"] == "dense" and not r["finetune_epochs"])
    full = [r for r in rows if r["allocation"] == "uniform" and r["target_mac_fraction"] == 1.0]
    assert full and all(set(r["densities"].values()) == {1.0} for r in full)
    for row in full:
        assert (row["top1"], row["val_top1"]) == (dense["top1"], dense["val_top1"])
    zero_skip = next(r for r in rows if r["strategy"] == "zero_skip")
    assert zero_skip["top1"] == dense["top1"]
    # zero-skipping layers execute their nonzero inputs; the first conv and the classifier stay
    # dense for every strategy, so they execute all their products here too
    assert zero_skip["zero_skip_mac_fraction"] == pytest.approx(dense["zero_skip_mac_fraction"])
    assert dense["zero_skip_mac_fraction"] < zero_skip["executed_mac_fraction"] < 1.0
    groups = summarize(rows)
    assert any(g.finetune_epochs for g in groups)
    assert frontier(groups, "small_cnn", "sapi", 1.0) is not None  # a 100 pt tolerance
    text = markdown(rows)
    assert "| sapi | element | global |" in text and "Frontier (sapi" in text


def _finetune_args(out: Path) -> list[str]:
    """``selact finetune`` of the smoke sweep's dense small_cnn (``sweep_rows``'s ``out``)."""
    dense = out.parent / "run" / "dense" / "model.safetensors"
    return ["finetune", "--task", "cifar10", "--model", "small_cnn", "--smoke", "--device", "cpu",
            "--data", str(SHARED_DATA), "--from", str(dense)]  # fmt: skip


@pytest.mark.slow
@needs_data
def test_finetune_command_searches_as_the_sweep_does(sweep_rows, tmp_path, monkeypatch):
    """``selact finetune --target --allocation global`` runs the budget search with the
    recipe's settings (lazy refresh, step limit), as the sweep does."""
    import selact.amu

    _, out, cache = sweep_rows
    monkeypatch.setenv("SELACT_CACHE", str(cache))
    seen = {}
    real = selact.amu.budget_search

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(selact.amu, "budget_search", spy)
    args = [
        *_finetune_args(out), "--strategy", "sapi", "--target", "0.5", "--allocation", "global",
        "--epochs", "1", "--run-dir", str(tmp_path / "ft"), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rec = recipe("small_cnn", "smoke")
    assert (seen["refresh"], seen["max_steps"]) == (rec.search_refresh, rec.search_steps)


@pytest.mark.slow
@needs_data
def test_finetune_reuses_searched_densities(sweep_rows, tmp_path, monkeypatch):
    """``selact finetune --densities RESULT.json`` takes an earlier run's searched densities (the
    search does not depend on the seed) without searching again; bad files are named."""
    import selact.amu

    _, out, cache = sweep_rows
    monkeypatch.setenv("SELACT_CACHE", str(cache))
    common = [*_finetune_args(out), "--strategy", "sapi", "--epochs", "1", "--no-progress"]
    first = tmp_path / "first.json"
    args = ["--target", "0.5", "--run-dir", str(tmp_path / "a"), "--json", str(first)]
    result = CliRunner().invoke(app, [*common, *args])
    assert result.exit_code == 0, result.output
    searched = json.loads(first.read_text())

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(selact.amu, "budget_search", no_search)
    again = tmp_path / "again.json"
    args = ["--densities", str(first), "--seed", "1", "--run-dir", str(tmp_path / "b"),
            "--json", str(again)]  # fmt: skip
    result = CliRunner().invoke(app, [*common, *args])
    assert result.exit_code == 0, result.output
    reused = json.loads(again.read_text())
    assert reused["densities"] == searched["densities"] and reused["seed"] == 1
    assert reused["target_mac_fraction"] == searched["target_mac_fraction"] == 0.5
    assert reused["densities_from"] == str(first)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"densities": {"features.0": 1.5}}))
    result = CliRunner().invoke(app, [*common, "--densities", str(bad)])
    assert result.exit_code != 0 and "bad.json" in result.output
    result = CliRunner().invoke(app, [*common, "--densities", str(first), "--target", "0.5"])
    assert result.exit_code != 0 and "one of --densities" in result.output


@pytest.mark.slow
@needs_data
def test_finetune_command_builds_the_finetuning_task(sweep_rows, monkeypatch):
    """``selact finetune`` trains on the recipe's fine-tuning settings, --task-arg over them."""
    from selact.cli_train import _build

    monkeypatch.setenv("SELACT_CACHE", str(sweep_rows[2]))
    _, dense = _build("cifar10", "vit", str(SHARED_DATA), "cpu", "smoke", None)
    _, tuned = _build("cifar10", "vit", str(SHARED_DATA), "cpu", "smoke", ["cutout=2"], True)
    dense, tuned = dense.describe(), tuned.describe()
    assert dense["auto_augment"] == "trivialaugment" and dense["mixup_alpha"] == 0.8
    assert "auto_augment" not in tuned and "mixup_alpha" not in tuned  # off
    assert tuned["cutout"] == 2 and tuned["label_smoothing"] == dense["label_smoothing"]


def test_frontier_needs_three_seeds_and_names_lower_candidates():
    def row(strategy, target, seed, val, epochs=10):
        return {"model": "m", "strategy": strategy, "granularity": "element",
                "allocation": "global", "target_mac_fraction": target, "finetune_epochs": epochs,
                "seed": seed, "top1": val - 0.01, "val_top1": val, "executed_mac_fraction": target,
                "zero_skip_mac_fraction": 0.5, "executed_over_zero_skip": 2 * target}  # fmt: skip

    dense = {**row("dense", 1.0, 0, 0.90, epochs=0), "granularity": None, "allocation": None}
    rows = [dense, *(row("sapi", 0.33, s, 0.899) for s in range(3)), row("sapi", 0.25, 0, 0.898)]
    groups = summarize(rows)
    assert frontier(groups, "m", "sapi", 0.003).target == 0.25
    assert frontier(groups, "m", "sapi", 0.003, min_seeds=3).target == 0.33
    text = markdown(rows)
    assert "3 seeds): element global at executed/dense 0.330" in text
    assert "Lower, with fewer seeds: element global at executed/dense 0.250" in text
    # The same seed twice is one seed: no frontier point.
    again = [dense, *(row("sapi", 0.33, 0, 0.899) for _ in range(3))]
    assert frontier(summarize(again), "m", "sapi", 0.003, min_seeds=3) is None
    assert "3 seeds): no fine-tuned setting qualifies" in markdown(again)
    assert "Rows from several runs" not in text
    # Rows merged from two runs (a GPU sweep, then a fine-tuning on the CPU) name both runs.
    gpu = {"hardware": "GPU", "commit": "aaaa", "command": "selact sweep --device cuda"}
    cpu = {"hardware": "CPU", "commit": "bbbb", "command": "selact sweep --device cpu"}
    merged = markdown([{**r, **gpu} for r in rows[:-1]] + [{**rows[-1], **cpu}])
    assert "Rows from several runs" in merged
    assert "- 4 rows: Scale `None`, GPU, commit `aaaa`" in merged
    assert "- 1 row: Scale `None`, CPU, commit `bbbb`" in merged


def test_smoke_never_writes_results(tmp_path):
    args = ["sweep", "--task", "cifar10", "--model", "small_cnn", "--smoke",
            "--out", "results/cifar10/small_cnn.json", "--data", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "results/" in result.output


def test_plan_puts_the_claims_first():
    rec = recipe("resnet20")
    jobs = plan(rec, (0, 1, 2))
    assert jobs[1].strategy == "sapi" and jobs[1].target == pytest.approx(1 / 3)
    assert jobs[2].strategy == "dense"  # the control
    assert [(j.strategy, j.seed) for j in jobs[3:5]] == [("sapi", 1), ("sapi", 2)]
    seeds = [j.seed for j in jobs if getattr(j, "target", None) == rec.frontier
             and j.strategy == "sapi" and j.allocation == "global"]  # fmt: skip
    assert sorted(seeds) == [0, 1, 2]
    assert recipe("vit").strategy == "sapw" and recipe("vit").frontier == 0.5


def test_overrides_change_the_plan_and_the_finetuning():
    base = SweepConfig(model="vit")
    assert sweep_recipe(base) == recipe("vit")
    rec = sweep_recipe(dataclasses.replace(base, strategy="sapi", finetune_epochs=20))
    assert (rec.strategy, rec.other, rec.finetune.epochs) == ("sapi", "sapw", 20)
    assert rec.finetune.lr == recipe("vit").finetune.lr  # only the epochs change
    jobs = plan(rec, (0, 1, 2))
    assert [(j.strategy, getattr(j, "seed", None)) for j in jobs[1:5]] == [
        ("sapi", 0), ("dense", 0), ("sapi", 1), ("sapi", 2)]  # fmt: skip
    # The frontier moved onto the lower target: its jobs are planned once.
    lower = sweep_recipe(dataclasses.replace(base, frontier=0.4))
    assert lower.frontier == lower.lower == 0.4
    jobs = plan(lower, (0, 1, 2))
    assert len(jobs) == len(set(jobs)) < len(plan(recipe("vit"), (0, 1, 2)))
    assert [j.seed for j in jobs if getattr(j, "target", None) == 0.4 and j.strategy == "sapw"
            and j.allocation == "global"] == [0, 1, 2]  # fmt: skip
    # Rows fine-tuned for another number of epochs are not this sweep's jobs.
    row = {"strategy": "sapi", "granularity": "element", "allocation": "global",
           "target_mac_fraction": 0.5, "finetune_epochs": 8, "seed": 0,
           "dense_checkpoint_sha256": "d"}  # fmt: skip
    assert done_jobs([row], "d", 8) == {Finetune("sapi", "element", "global", 0.5, 0)}
    assert done_jobs([row], "d", rec.finetune.epochs) == set()
    # ... nor rows fine-tuned with other task settings (rows without them still count).
    assert done_jobs([{**row, "task_args": {"cutout": 8}}], "d", 8, {"cutout": 0}) == set()
    assert done_jobs([{**row, "task_args": {"cutout": 0}}], "d", 8, {"cutout": 0}) == {
        Finetune("sapi", "element", "global", 0.5, 0)}  # fmt: skip
    assert len(done_jobs([row], "d", 8, {"cutout": 0})) == 1
    for field, bad, match in (
        ("strategy", "random", "strategy"),
        ("finetune_epochs", 0, "at least"),
        ("frontier", 0.0, "frontier"),
    ):
        with pytest.raises(ValueError, match=match):
            sweep_recipe(dataclasses.replace(base, **{field: bad}))


def test_task_args_override_the_recipe_and_reach_the_shards(tmp_path):
    config = SweepConfig(model="vgg16", task_args={"auto_augment": "randaugment", "cutout": 0})
    rec = sweep_recipe(config)
    assert rec.task_args == {"label_smoothing": 0.1, "cutout": 0, "auto_augment": "randaugment"}
    assert recipe("vgg16").task_args["cutout"] == 8  # the recipe itself is untouched
    assert recipe("vgg16").task_args["auto_augment"] == "trivialaugment"
    args = _child_args(config, "c", tmp_path / "d", tmp_path / "o", tmp_path / "r",
                       tmp_path / "s", "1/2", None)  # fmt: skip
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--task-arg"]
    assert pairs == ['auto_augment="randaugment"', "cutout=0"]
    assert "--finetune-task-arg" not in args
    result = CliRunner().invoke(app, ["sweep", "--smoke", "--task-arg", "colour=1",
                                      "--out", str(tmp_path / "rows.json")])  # fmt: skip
    assert result.exit_code == 1 and "no setting colour" in result.output


def test_finetuning_has_its_own_task_settings(tmp_path):
    # The ViT fine-tunes with crop and flip only; the CNNs as they were trained.
    vit, vgg = recipe("vit"), recipe("vgg16", "cpu")
    assert vit.task_args["mixup_alpha"] > 0 and vit.task_args["auto_augment"] == "trivialaugment"
    ft = vit.finetune_settings()
    assert ft["mixup_alpha"] == ft["cutmix_alpha"] == 0 and ft["auto_augment"] is None
    assert ft["label_smoothing"] == vit.task_args["label_smoothing"]
    assert vgg.finetune_settings() == vgg.task_args
    # --task-arg reaches both (over the recipe's fine-tuning settings too),
    # --finetune-task-arg fine-tuning alone, over everything.
    config = SweepConfig(model="vit", task_args={"mixup_alpha": 0.2, "cutout": 4},
                         finetune_task_args={"cutout": 2})  # fmt: skip
    rec = sweep_recipe(config)
    assert rec.task_args["mixup_alpha"] == 0.2 and rec.task_args["cutout"] == 4
    ft = rec.finetune_settings()
    assert ft["mixup_alpha"] == 0.2 and ft["cutout"] == 2 and ft["auto_augment"] is None
    args = _child_args(config, "c", tmp_path / "d", tmp_path / "o", tmp_path / "r",
                       tmp_path / "s", "1/2", None)  # fmt: skip
    assert [args[i + 1] for i, a in enumerate(args) if a == "--finetune-task-arg"] == ["cutout=2"]
    assert (
        sweep_recipe(SweepConfig(model="vit")).finetune_settings()
        == recipe("vit").finetune_settings()
    )


@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_shards_partition_the_plan(scale):
    jobs = plan(recipe("resnet20", scale), (0, 1, 2), scale)
    assert len(set(jobs)) == len(jobs)  # distinct jobs: sets below compare exactly
    for count in range(1, 5):
        shards = [shard_jobs(jobs, (i, count)) for i in range(count)]
        assert sum(len(shard) for shard in shards) == len(jobs)
        assert set().union(*shards) == set(jobs)  # with the count: disjoint, union = plan
        for i, shard in enumerate(shards):
            assert shard == jobs[i::count]  # round robin, priority order kept
            assert shard[0] == jobs[i]
    assert shard_jobs(jobs, None) == jobs


def test_shard_validation(tmp_path):
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 0/1 ") == (0, 1)
    for bad in ("2", "a/4", "1/2/3", "", "2/2", "5/4", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    base = {"model": "small_cnn", "scale": "smoke", "device": "cpu", "data": str(tmp_path)}
    for fields, match in (
        ({"shard": (1, 2)}, "dense_checkpoint"),
        ({"shard": (2, 2), "dense_checkpoint": "x"}, "2/2"),
        ({"workers": 0}, "workers=0"),
        ({"workers": 2, "shard": (0, 2)}, "cannot be combined"),
    ):
        with pytest.raises(ValueError, match=match):  # before any data is read
            run_sweep(SweepConfig(**base, **fields))
    cli = ["sweep", "--task", "cifar10", "--model", "small_cnn", "--smoke", "--device", "cpu",
           "--data", str(tmp_path), "--out", str(tmp_path / "rows.json")]  # fmt: skip
    for shard, message in (("2/2", "2/2"), ("x", "'x'"), ("1/2", "dense-checkpoint")):
        result = CliRunner().invoke(app, [*cli, "--shard", shard])
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "rows.json").exists()


def test_merge_keeps_a_failed_shards_rows(tmp_path, caplog):
    rows = _Rows(tmp_path / "rows.json", {}, [{"strategy": "dense"}])
    children = []
    for i, code in ((1, 3), (2, 0), (3, 0)):
        out = tmp_path / f"rows.shard{i}.json"
        if i < 3:  # shard 3 wrote no rows
            out.write_text(json.dumps([{"strategy": "sapi", "shard": f"{i}/4"}]))
        process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
        process.wait()
        children.append(_Child(f"{i}/4", out, tmp_path / "log", process, threading.Thread()))
    with caplog.at_level("INFO"):
        merged = _merge(rows, children)
    assert [r.get("shard") for r in merged] == ["1/4", "2/4"]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows.rows and len(rows.rows) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
    assert "shard 1/4 failed (exit 3" in caplog.text and "rows.shard1.json" in caplog.text


def test_merge_shard_files_adds_leftover_shards(tmp_path):
    """A sweep killed before its merge leaves shard files; merge_shard_files appends them."""
    out = tmp_path / "m.json"
    out.write_text(json.dumps([{"strategy": "dense"}]))
    for i in (2, 1):
        (tmp_path / f"m.shard{i}.json").write_text(json.dumps([{"strategy": "sapi", "i": i}]))
    (tmp_path / "m.shard3.json").write_text("{broken")  # unreadable: left where it is
    assert merge_shard_files(out) == 2
    rows = json.loads(out.read_text())
    assert [r.get("i") for r in rows] == [None, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.shard3.json"]
    assert merge_shard_files(tmp_path / "none.json") == 0


def test_dense_epoch_time_is_timed_here_for_a_checkpoint_from_elsewhere():
    """A dense checkpoint from another machine (a GPU), or trained while the device was not
    shared, does not set a sweep's time plan."""
    from selact.train import TrainConfig, hardware
    from tests.test_train import _net

    task = create_task("toy")
    config = TrainConfig(batch_size=32, amp="off")
    here = {"hardware": hardware("cpu"), "history": [{"seconds": 123.0}]}
    assert _dense_epoch_seconds(here, task, _net(), config, "cpu") == 123.0
    elsewhere = {**here, "hardware": "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130"}
    assert 0.0 < _dense_epoch_seconds(elsewhere, task, _net(), config, "cpu") < 30.0
    # sweep processes sharing the device: timed now, not read from a run that had it alone
    assert 0.0 < _dense_epoch_seconds(here, task, _net(), config, "cpu", shared=True) < 30.0


def _keys(rows):
    return {(r["strategy"], r["granularity"], r["allocation"], r["finetune_epochs"], r["seed"])
            for r in rows}  # fmt: skip


@pytest.mark.slow
@needs_data
def test_workers_merge_the_shards(sweep_rows, tmp_path, caplog):
    """--workers 2: the parent trains the dense model, runs shard 0/2, a child process runs
    shard 1/2; the rows are those of one process, merged into --out; each budget search runs in
    one of the two processes."""
    single, _, cache = sweep_rows
    caplog.set_level(logging.INFO)  # the parent's log here, and the child runs with -v
    out = tmp_path / "small_cnn.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELACT_CACHE", str(cache))
        args = [
            "sweep", "--task", "cifar10", "--model", "small_cnn", "--smoke", "--device", "cpu",
            "--data", str(SHARED_DATA), "--out", str(out), "--run-dir", str(tmp_path / "run"),
            "--max-finetunes", "2", "--workers", "2", "--time-budget", "600",
        ]  # fmt: skip
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert _keys(rows) == _keys(single)
    assert len(rows) == len(single)
    assert len([r for r in rows if r["strategy"] == "dense" and not r["finetune_epochs"]]) == 1
    assert {r.get("shard") for r in rows} == {None, "0/2", "1/2"}  # None: dense, zero_skip
    assert len({r["dense_checkpoint"] for r in rows}) == 1
    assert len({r["command"] for r in rows}) == 1 and len({r["commit"] for r in rows}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "small_cnn.json"]  # no shards
    child_log = (tmp_path / "run" / "shard1" / "sweep.log").read_text()
    assert child_log
    # Both shards start with jobs needing SAPI's global search: one process runs it.
    ran = caplog.text.count("search ('sapi', 'element', 'global'):")
    ran += child_log.count("search ('sapi', 'element', 'global'):")
    assert ran == 1, caplog.text + child_log
    assert (tmp_path / "run" / "searches" / "sapi-element-global.json").is_file()


def test_done_rows_skip_their_jobs(sweep_rows, tmp_path):
    """A sweep given an earlier sweep's rows (same dense checkpoint) runs only the jobs they do
    not hold: none at all when they hold every one."""
    rows, out, cache = sweep_rows
    dense = next(r for r in rows if r["strategy"] == "dense" and not r["finetune_epochs"])
    rec = recipe("small_cnn", "smoke")
    done = done_jobs(rows, dense["checkpoint_sha256"], rec.finetune.epochs)
    assert "dense" in done
    left = _jobs(rec, SweepConfig(scale="smoke", max_finetunes=2), None, done)
    assert left == [] and len(_jobs(rec, SweepConfig(scale="smoke", max_finetunes=2), None)) > 0
    assert done_jobs(rows, "another checkpoint", rec.finetune.epochs) == set()
    assert not any(isinstance(j, Finetune) for j in done_jobs(rows, dense["checkpoint_sha256"], 99))
    # the fixture fine-tuned with cutout 4: a sweep with the recipe's 8 would fine-tune again
    other = done_jobs(
        rows, dense["checkpoint_sha256"], rec.finetune.epochs, rec.finetune_settings()
    )
    assert not any(isinstance(j, Finetune) for j in other) and "dense" in other
    again = tmp_path / "again.json"
    config = SweepConfig(
        model="small_cnn", scale="smoke", device="cpu", data=str(SHARED_DATA), out=str(again),
        run_dir=str(out.parent / "run"), dense_checkpoint=dense["dense_checkpoint"],
        done_rows=str(out), max_finetunes=2, finetune_task_args={"cutout": 4},
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELACT_CACHE", str(cache))
        assert run_sweep(config) == []
    with pytest.raises(FileNotFoundError, match="no such rows file"):
        read_rows(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="bad.json: expected a list of rows"):
        read_rows(tmp_path / "bad.json")
