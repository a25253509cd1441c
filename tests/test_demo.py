"""``selact demo --smoke`` end to end: the CLI, the JSON it writes, and what the table must show."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selact.cli import app
from selact.experiments.demo import DemoConfig, run_demo

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DENSITIES = [1.0, 0.5, 0.35, 0.25]

needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason="no ../shared/data"
)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole session (same path in test_data_cifar10), so the real
    archive is unpacked and decoded once per session."""
    path = tmp_path_factory.getbasetemp() / "selact-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def smoke_run(shared_cache, tmp_path, monkeypatch):
    """Run ``selact demo --smoke`` through the CLI; return its output and the JSON it wrote."""
    monkeypatch.setenv("SELACT_CACHE", str(shared_cache))
    monkeypatch.delenv("SELACT_DATA", raising=False)
    out = tmp_path / "results" / "demo.json"
    args = ["demo", "--smoke", "--no-progress", "--data", str(SHARED_DATA), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text()), out


@pytest.mark.slow
@needs_data
def test_smoke_table(smoke_run):
    output, payload, out = smoke_run
    rows = payload["rows"]
    assert [(r["strategy"], r["density"]) for r in rows] == [
        ("dense", 1.0),
        ("zero_skip", 1.0),
    ] + [(s, d) for s in ("sapi", "sapw") for d in DENSITIES]
    for name in ("dense", "sapi", "sapw", "exec/dense"):
        assert name in output
    assert payload["config"]["epochs"] == 1 and payload["config"]["train_limit"] == 512
    assert payload["train_seconds"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["demo.json"]  # no temporary file left

    dense, zero_skip = rows[0], rows[1]
    assert dense["top1"] == payload["dense_top1"]
    assert dense["executed_mac_fraction"] == 1.0  # nothing converted: every MAC is done
    assert zero_skip["top1"] == dense["top1"]  # skipping zeros changes no prediction
    assert zero_skip["executed_mac_fraction"] < 1.0
    for strategy in ("sapi", "sapw"):
        mine = [r for r in rows if r["strategy"] == strategy]
        full = mine[0]
        assert full["density"] == 1.0
        assert full["top1"] == dense["top1"]  # density 1.0 is exactly the dense model
        # ... and executes what zero-skipping does: kept zeros cost nothing
        for key in ("executed_mac_fraction", "zero_skip_mac_fraction"):
            assert full[key] == zero_skip[key]
        executed = [r["executed_mac_fraction"] for r in mine]
        assert all(a > b for a, b in zip(executed, executed[1:], strict=False)), executed
        for r in mine:
            assert 0.0 <= r["top1"] <= 1.0
            assert 0.0 < r["zero_skip_mac_fraction"] < 1.0  # ReLU zeros are free sparsity
            assert math.isclose(
                r["executed_over_zero_skip"],
                r["executed_mac_fraction"] / r["zero_skip_mac_fraction"],
                rel_tol=1e-9,
            )
            # The stem conv and the classifier stay dense: about 6 % of small_cnn's MACs.
            assert r["executed_mac_fraction"] <= r["density"] + 0.1
        assert mine[-1]["executed_over_zero_skip"] < 0.6  # the AMU cuts far below ReLU sparsity


@pytest.mark.slow
@needs_data
def test_smoke_is_deterministic(smoke_run):
    """The library call with the CLI's settings repeats the CLI's rows exactly."""
    _, payload, _ = smoke_run
    result = run_demo(DemoConfig.smoke(data=str(SHARED_DATA)))
    assert [row.to_dict() for row in result.rows] == payload["rows"]
    assert result.dense_top1 == payload["dense_top1"]


def test_missing_data_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["demo", "--smoke", "--data", str(tmp_path / "absent")])
    assert result.exit_code == 1
    assert "absent" in result.output and "does not exist" in result.output
