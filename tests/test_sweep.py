"""``selact sweep --smoke`` end to end: rows, budgets checked by an independent MAC count,
density 1.0 equal to dense, the report, and no smoke output under results/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import selact
from selact.cli import app
from selact.experiments.recipes import recipe
from selact.experiments.report import frontier, markdown, summarize
from selact.experiments.sweep import _calibration, plan
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
    calib = _calibration(task, rec)
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
