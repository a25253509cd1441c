"""The VOC sweep at smoke scale on a synthetic VOCdevkit tree: rows, report files, resume."""

from __future__ import annotations

import json

import pytest
import torch

from selact.experiments.voc_report import summarize
from selact.experiments.voc_sweep import Row, SweepConfig, row_model, run_sweep
from tests import voc_tree

FIELDS = {
    "strategy",
    "layers",
    "granularity",
    "target_density",
    "executed_mac_fraction",
    "zero_skip_mac_fraction",
    "map50",
    "finetune_epochs",
    "seed",
    "scale",
    "hardware",
    "command",
    "checkpoint_sha256",
    "commit",
    "date",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELACT_DATA", raising=False)


@pytest.mark.slow
def test_smoke_sweep_rows_report_and_resume(tmp_path):
    tree = voc_tree.make_tree(tmp_path / "voc")
    out = tmp_path / "out" / "det.json"
    config = SweepConfig.for_scale(
        "smoke", data=str(tree), run_dir=str(tmp_path / "run"), out=str(out)
    )
    torch.set_num_threads(1)
    document = run_sweep(config, progress=False, command="test")
    rows = document["rows"]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 11
    for r in rows:
        assert FIELDS <= set(r) and 0.0 <= r["map50"] <= 1.0 and r["scale"] == "smoke"
    dense = rows[0]
    assert (dense["strategy"], dense["layers"]) == ("dense", "none")
    assert dense["executed_mac_fraction"] == 1.0
    zs = next(r for r in rows if r["strategy"] == "zero_skip")
    # zero-skipping on converted layers; the stem and predictors stay dense (executed = dense)
    # but their zero inputs still count in the zero-skipping total
    assert zs["zero_skip_mac_fraction"] <= zs["executed_mac_fraction"] < 1.0
    # every row counts the same layers (the attention's in-projection included)
    assert len({r["dense_macs_per_image"] for r in rows}) == 1
    sapi = {r["layers"]: r for r in rows if r["strategy"] == "sapi" and not r["finetune_epochs"]}
    assert sapi["all"]["executed_mac_fraction"] < sapi["conv"]["executed_mac_fraction"] < 1
    assert sapi["all"]["executed_mac_fraction"] < sapi["attn_linear"]["executed_mac_fraction"]
    assert {r["finetune_epochs"] for r in rows} == {0, 1}
    # report files beside the JSON
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 11 and "smoke" in saved["experiments"]
    for name in ("det-smoke.md", "det-smoke-map-vs-macs.png", "det-smoke-detections.png"):
        assert (out.parent / name).stat().st_size > 0
    assert "| sapw | attn_linear |" in (out.parent / "det-smoke.md").read_text()
    # resume: everything is read back, nothing is evaluated again
    lines = (tmp_path / "run" / "rows.jsonl").read_text().count("\n")
    again = run_sweep(config, progress=False, command="test")
    assert (tmp_path / "run" / "rows.jsonl").read_text().count("\n") == lines
    assert [r["map50"] for r in again["rows"]] == [r["map50"] for r in rows]


def test_smoke_never_writes_results():
    with pytest.raises(ValueError, match="never write to results"):
        SweepConfig.for_scale("smoke", out="results/voc/det.json")
    with pytest.raises(ValueError, match="scale"):
        SweepConfig(scale="huge")


def test_row_model_groups():
    from selact.models import create_model
    from selact.tasks.voc import PRESETS

    dense = create_model("det", **PRESETS["smoke"]).eval()
    model = row_model(dense, Row("sapi", "conv", "element", 0.25, 0))
    strategies = {
        m.layer_name: m.config.strategy for m in model.modules() if hasattr(m, "layer_name")
    }
    assert strategies["backbone.c3.0.conv1"] == "sapi"
    assert strategies["backbone.neck.blocks.0.mlp.0"] == "dense"
    assert strategies["backbone.neck.blocks.0.attn.in_proj"] == "dense"
    assert "backbone.stem.0" not in strategies
    model = row_model(dense, Row("sapw", "attn_linear", "element", 0.25, 0))
    strategies = {
        m.layer_name: m.config.strategy for m in model.modules() if hasattr(m, "layer_name")
    }
    assert strategies["backbone.neck.blocks.0.attn.out_proj"] == "sapw"
    assert strategies["backbone.c3.0.conv1"] == "dense"


def test_summary_picks_cheapest_within_tolerance():
    def row(strategy, layers, density, frac, m, ft=0):
        return {
            "strategy": strategy,
            "layers": layers,
            "target_density": density,
            "granularity": "element",
            "finetune_epochs": ft,
            "executed_mac_fraction": frac,
            "zero_skip_mac_fraction": 0.6,
            "executed_over_zero_skip": frac / 0.6,
            "map50": m,
            "key": f"{strategy}-{layers}-{density}-{ft}",
        }

    rows = [
        row("dense", "none", 1.0, 1.0, 0.400),
        row("zero_skip", "all", 1.0, 0.6, 0.400),
        row("sapi", "all", 0.5, 0.45, 0.398),
        row("sapw", "all", 0.5, 0.45, 0.399),
        row("sapi", "all", 0.25, 0.30, 0.394),  # 0.6 pt below: out
        row("sapi", "all", 0.25, 0.30, 0.3955, ft=1),  # 0.45 pt below: in, cheapest
    ]
    summary = summarize(rows)
    best = summary["best_within_tolerance"]
    assert best["key"] == "sapi-all-0.25-1" and best["meets_one_third"]
    assert best["meets_two_thirds_of_zero_skip"]  # 0.30 / 0.6 = 0.5
    (pair,) = summary["sapw_vs_sapi"]  # only density 0.5 without fine-tuning has both
    assert pair["layers"] == "all" and pair["sapw_minus_sapi_pt"] == pytest.approx(0.1)
    rows[4]["map50"] = rows[5]["map50"] = 0.1
    rows[2]["map50"] = rows[3]["map50"] = 0.1
    assert summarize(rows)["best_within_tolerance"] is None
