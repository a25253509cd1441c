"""`selact train|eval|finetune|sweep --task voc --model det --smoke` on a synthetic tree."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from selact.cli import app
from tests import voc_tree


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELACT_DATA", raising=False)


@pytest.mark.slow
def test_voc_commands_smoke(tmp_path):
    tree = voc_tree.make_tree(tmp_path / "voc")
    common = ["--task", "voc", "--model", "det", "--smoke", "--data", str(tree)]
    common += ["--run-dir", str(tmp_path / "run"), "--no-progress", "--threads", "1"]
    runner = CliRunner()
    result = runner.invoke(app, ["train", *common])
    assert result.exit_code == 0, result.output
    assert "val mAP@0.5" in result.output
    predictions = tmp_path / "preds.pt"
    result = runner.invoke(app, ["eval", *common, "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)  # warnings and logs go to stderr
    assert row["strategy"] == "dense" and row["executed_mac_fraction"] == 1.0
    blob = torch.load(predictions, weights_only=True)
    assert len(blob["predictions"]) == len(blob["targets"]) == 4
    args = ["--strategy", "sapw", "--layers", "attn_linear", "--density", "0.5"]
    result = runner.invoke(app, ["finetune", *common, *args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["finetune_epochs"] == 1
    out = tmp_path / "out" / "det.json"
    result = runner.invoke(app, ["sweep", *common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["rows"]) == 11
    result = runner.invoke(app, ["sweep", *common, "--task", "cifar10"])
    assert result.exit_code != 0
