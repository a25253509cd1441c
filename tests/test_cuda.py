"""The same results on CUDA as on the CPU: MGEMM ops, masks, counts and converted models.

Marked ``gpu``: collected everywhere, skipped where no CUDA device is present (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import selact
from selact import mgemm
from tests.models import build

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(TOL))
def test_mgemm_ops_match_cpu(dtype):
    x = torch.randn(4, 7, 33).clamp_min(0).to(dtype)
    w = torch.randn(19, 33).to(dtype)
    mask = torch.rand(4, 7, 33) < 0.5
    y_cpu, macs_cpu = mgemm.linear(x.float(), w.float(), in_mask=mask)
    y, macs = mgemm.linear(x.cuda(), w.cuda(), in_mask=mask.cuda())
    assert macs.device.type == "cuda" and int(macs) == int(macs_cpu)
    torch.testing.assert_close(y.float().cpu(), y_cpu, rtol=TOL[dtype], atol=TOL[dtype] * 10)

    xc = torch.randn(2, 6, 9, 11).clamp_min(0).to(dtype)
    wc = torch.randn(8, 3, 3, 3).to(dtype)
    mc = torch.rand(2, 6, 1, 1) < 0.5
    y_cpu, macs_cpu = mgemm.conv2d(xc.float(), wc.float(), None, 2, 1, 1, 2, in_mask=mc)
    y, macs = mgemm.conv2d(xc.cuda(), wc.cuda(), None, 2, 1, 1, 2, in_mask=mc.cuda())
    assert int(macs) == int(macs_cpu)
    torch.testing.assert_close(y.float().cpu(), y_cpu, rtol=TOL[dtype], atol=TOL[dtype] * 10)

    p = torch.rand(2, 3, 5, 8).softmax(-1).to(dtype)
    v = torch.randn(2, 3, 8, 4).to(dtype)
    km = torch.rand(2, 3, 5, 8) < 0.5
    o_cpu, macs_cpu = mgemm.attention_values(p.float(), v.float(), key_mask=km)
    o, macs = mgemm.attention_values(p.cuda(), v.cuda(), key_mask=km.cuda())
    assert int(macs) == int(macs_cpu)
    torch.testing.assert_close(o.float().cpu(), o_cpu, rtol=TOL[dtype], atol=TOL[dtype] * 10)


def test_mask_on_wrong_device_is_refused():
    with pytest.raises(ValueError, match="cpu"):
        mgemm.linear(
            torch.randn(2, 4).cuda(),
            torch.randn(3, 4).cuda(),
            in_mask=torch.ones(4, dtype=torch.bool),
        )


def _assert_same_output(actual, expected, exact, dtype):
    """``actual`` (selective at density 1.0) reproduces ``expected`` (dense, same dtype). In bf16 a
    deep model's outputs move with the order of roundings (a ViT-B/16's logits 1.4 % apart in norm
    on an H100, after 12 blocks), so there the selective model must be as close to the float32
    model ``exact`` as the dense bf16 model is (within half again its error); float32 and float16
    are compared elementwise."""
    if dtype == torch.bfloat16:
        error = float((actual.float() - exact).norm() / exact.norm())
        dense_error = float((expected.float() - exact).norm() / exact.norm())
        assert error <= 1.5 * dense_error + 1e-3, f"{error:.2e} against dense {dense_error:.2e}"
    else:
        torch.testing.assert_close(actual, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "swin_t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_models_on_cuda(name, dtype):
    model, x = build(name)
    model, x = model.cuda(), x.cuda()
    with torch.no_grad():
        exact = model(x).float()
        model, x = model.to(dtype), x.to(dtype)
        dense = model(x)
        selact.sparsify(model, density=1.0, strategy="sapw")
        _assert_same_output(model(x), dense, exact, dtype)
        selact.densify(model)
        selact.sparsify(model, density=0.5, key_density=0.5, check_finite=False)
        sparse = model(x)
    report = selact.stats(model)
    assert (sparse - dense).float().norm() > 1e-3 * dense.float().norm()
    for layer_name, s in report.layers.items():
        assert s.calls > 0, layer_name
        if s.converted:
            assert s.executed_macs < s.dense_macs, layer_name


def test_cuda_graph_training_matches_eager(caplog):
    """Dense training with the model's forward and backward replayed as CUDA graphs ends with the
    weights of eager training (float32; evaluation between epochs runs the module's own forward),
    and leaves the model's forward as it was."""
    from selact.train import TaskOptions, TrainConfig, fit
    from tests.test_train import Toy, _net

    class CudaToy(Toy):
        def __init__(self, options):
            super().__init__(options)
            self.data = {k: (x.cuda(), y.cuda()) for k, (x, y) in self.data.items()}

    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, eval_every=1, amp="off")
    task = CudaToy(TaskOptions(device="cuda"))
    with caplog.at_level("INFO", logger="selact.train.loop"):
        graphed = fit(task, _net(), config.replace(cuda_graph=True), progress=False)
    assert "replayed as CUDA graphs" in caplog.text
    eager = fit(task, _net(), config, progress=False)
    assert "forward" not in vars(graphed.model)
    pairs = zip(graphed.model.state_dict().values(), eager.model.state_dict().values(), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4)
    assert graphed.metrics["test"]["top1"] == pytest.approx(eager.metrics["test"]["top1"], abs=0.02)


@pytest.mark.parametrize("kind", ["rows", "shared"])
def test_every_triton_tile_candidate_matches_the_reference(kind, monkeypatch):
    """Each tile configuration the tuner may choose, in bf16 on this GPU, against the reference:
    the interpreter (CI) runs only a few, and a choice is timed, not checked. Sizes divisible by 16
    as the benchmark's are (Triton compiles them alike) with partial blocks; each case runs twice,
    so a fused K split must have set its tile counts back to 0. 40 shared rows: every row block
    (16-64) is a candidate, the last one partial."""
    from selact.mgemm import triton_kernels

    monkeypatch.setenv("SELACT_TRITON_AUTOTUNE", "0")
    g = torch.Generator().manual_seed(0)
    rows = 1 if kind == "rows" else 40
    x = torch.randn(rows, 2000, generator=g).clamp_min(-0.2).to("cuda", torch.bfloat16)
    w = (torch.randn(1040, 2000, generator=g) / 45).to("cuda", torch.bfloat16)
    b = torch.randn(1040, generator=g).to("cuda", torch.bfloat16)
    shape = (rows, 2000) if kind == "rows" else (2000,)
    mask = (torch.rand(*shape, generator=g) < 0.4).cuda()
    expected, _ = mgemm.linear(x, w, b, in_mask=mask, backend="reference")
    candidates = triton_kernels.ROWS_TILES if kind == "rows" else triton_kernels.SHARED_TILES
    name = "ROWS_TILES" if kind == "rows" else "SHARED_TILES"
    for tiles in candidates:
        monkeypatch.setattr(triton_kernels, name, [tiles])
        triton_kernels.forget_tuning()
        for _ in range(2):
            y, _ = mgemm.linear(x, w, b, in_mask=mask, backend="triton")
            torch.testing.assert_close(y.float(), expected.float(), rtol=2e-2, atol=2e-2,
                                       msg=lambda m, t=tiles: f"{t}: {m}")  # fmt: skip
    for counts in triton_kernels._COUNTS.values():
        assert not counts.any(), "a fused K split left a tile's count set"
