"""The benchmarks' --quick mode end to end: every route checked and timed, files only where asked."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from selact.bench import kernels
from selact.bench.timing import median_ms
from selact.cli import app

pytestmark = pytest.mark.slow


def test_quick_kernel_bench_times_every_route(tmp_path):
    rows = list(kernels.run(kernels.cpu_cases(quick=True), "cpu", reps=3))
    routes = {(r["op"], r["backend"]) for r in rows}
    assert {
        ("linear", "dense"),
        ("linear", "cpu"),
        ("linear", "reference"),
        ("linear", "mask_multiply"),
        ("linear", "gather"),
        ("linear", "cpu_kernel"),  # the kernel alone, checked against the reference like all
        ("linear", "dense_kept"),  # dense PyTorch on a layer of the kept size
    } <= routes
    assert {("conv2d", "dense"), ("conv2d", "gather"), ("conv2d", "mask_multiply")} <= routes
    assert ("conv2d", "dense_kept") in routes
    spatial = {r["backend"] for r in rows if r["granularity"] == "spatial"}
    assert {"dense", "cpu", "cpu_kernel", "reference"} <= spatial
    element = {r["backend"] for r in rows if r["granularity"] == "element" and r["op"] == "conv2d"}
    assert {"dense", "cpu", "cpu_kernel", "reference"} <= element
    assert {("conv2d", "cpu"), ("conv2d", "cpu_kernel")} <= routes
    for row in rows:
        assert row["median_ms"] > 0
        assert row["ratio_to_ideal"] == pytest.approx(row["ratio_to_dense"] / row["density"])
        if row["backend"] == "dense":
            assert row["ratio_to_dense"] == 1.0


def test_quick_cli_writes_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "kernels", "--quick", "--reps", "3"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "results").exists()
    args = ["bench", "model", "--quick", "--reps", "3", "--compile", "--strategy", "sapw"]
    args += ["--counting", "--out", "runs"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = sorted(p.suffix for p in (tmp_path / "runs").iterdir())
    assert written == [".json", ".md", ".png"]
    rows = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    by_route = {r["backend"]: r for r in rows}
    compiled_routes = {"dense, compiled", "selective, compiled"}
    assert set(by_route) == {"dense", "selective", "selective, counting", *compiled_routes}
    assert by_route["selective"]["strategy"] == "sapw"
    counted = by_route["selective, counting"]  # the same masks: the same executed MACs
    assert counted["executed_mac_fraction"] == by_route["selective"]["executed_mac_fraction"] < 1
    compiled = by_route["selective, compiled"]  # against the compiled dense model
    assert compiled["ratio_to_dense"] == pytest.approx(
        compiled["median_ms"] / by_route["dense, compiled"]["median_ms"]
    )
    assert all({"machine", "versions", "commit", "date"} <= set(r) for r in rows)
    result = runner.invoke(app, ["bench", "kernels", "--quick", "--out", "results/bench"])
    assert result.exit_code != 0 and "never go to results" in result.output


def test_routes_take_turns_in_a_shuffled_order():
    """No route always follows the same one (the route after dense paid for its traffic)."""
    calls: list[str] = []
    routes = {name: [lambda name=name: calls.append(name)] for name in "abcd"}
    times = median_ms(routes, reps=30, warmup=0)
    assert set(times) == set("abcd") and all(t >= 0 for t in times.values())
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 30 and all(sorted(r) == list("abcd") for r in rounds)
    for name in "abcd":
        before = {r[r.index(name) - 1] for r in rounds if r.index(name) > 0}
        assert len(before) == 3, (name, before)  # each other route came just before it


def test_quick_model_bench_with_searched_densities(tmp_path):
    """``--conv-granularity element --densities FILE``: the layers' densities from a budget
    search's result, the rows' density the executed MAC fraction; a file that names no densities,
    or one for several models, is refused naming it."""
    runner = CliRunner()
    layers = {"stages.0.1": 0.5, "stages.1.1": 0.25}
    path = tmp_path / "densities.json"
    path.write_text(json.dumps({"densities": layers, "target_mac_fraction": 0.4}))
    args = ["bench", "model", "--quick", "--reps", "3", "--conv-granularity", "element"]
    result = runner.invoke(app, [*args, "--densities", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    selective = next(r for r in rows if r["backend"] == "selective")
    assert selective["granularity"] == "element/element"
    assert selective["density"] == selective["executed_mac_fraction"] < 1
    assert selective["densities_from"] == str(path)
    path.write_text(json.dumps({"stages.0.1": 1.5}))
    result = runner.invoke(app, [*args, "--densities", str(path)])
    assert result.exit_code != 0 and "densities.json" in result.output
    result = runner.invoke(app, [*args, "--densities", str(path), "--model", "a", "--model", "b"])
    assert result.exit_code != 0 and "one --model" in result.output


@pytest.mark.parametrize(
    ("model", "flags", "name"),
    [
        ("AMD EPYC", {"fma", "avx2"}, "amd-epyc-2c-avx2"),
        ("AMD EPYC", {"avx2", "avx512f", "avx512bw"}, "amd-epyc-2c-avx512"),
        ("Intel(R) Xeon(R) Processor", {"sse4_2"}, "intel-xeon-processor-2c"),
    ],
)
def test_cpu_machine_is_named_by_model_cores_and_vector_instructions(
    monkeypatch, model, flags, name
):
    """Results files are named by machine; CPUs of one model name with and without AVX-512 (whose
    kernels differ) get different names."""
    from selact.bench import report

    monkeypatch.setattr(report.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(report, "_cpu_info", lambda: (model, flags))
    monkeypatch.setattr(report.os, "cpu_count", lambda: 2)
    assert report.machine() == name
