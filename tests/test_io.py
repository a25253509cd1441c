"""selact.save / selact.load: exact round trips, atomic writes, and clear errors."""

import os
import stat

import pytest
import safetensors.torch
import torch
from torch import nn

import selact
from selact.nn import SelectiveModule, selective_configs


def mlp(seed=0, hidden=24):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(12, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 5),
        )


def cnn(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 4),
        )


INPUTS = {"mlp": (12,), "cnn": (3, 6, 6)}


def data(kind, n=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((16, *INPUTS[kind]), generator=generator) for _ in range(n)]


def calibrated_mlp():
    """Per-layer overrides of every kind, a threshold budget and calibrated thresholds."""
    model = selact.sparsify(
        mlp(seed=0),
        strategy="sapi",
        density=0.5,
        budget="threshold",
        filter_fn=lambda module, name: isinstance(module, nn.Linear),
        overrides={
            "0": {"strategy": "sapw", "density": 0.25, "granularity": "block", "block": 4},
            r"re:[24]": {"density": 0.35, "budget": "topk", "granularity": "batch_shared"},
            "4": {"strategy": "random"},  # exact name beats the regex
            "6": None,  # stays dense
        },
    )
    selact.calibrate(model, data("mlp"))
    return model


def calibrated_cnn():
    model = selact.sparsify(
        cnn(seed=0),
        density=0.4,
        budget="threshold",
        granularity="channel",
        overrides={"2": {"strategy": "sapw", "granularity": "element"}},
    )
    selact.calibrate(model, data("cnn"))
    return model


def selective(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SelectiveModule)}


# --- round trips ------------------------------------------------------------------------------


def test_mlp_round_trip_reproduces_outputs_configs_and_thresholds(tmp_path):
    model = calibrated_mlp()
    path = selact.save(model, tmp_path / "mlp.safetensors")
    assert path == tmp_path / "mlp.safetensors"
    fresh = mlp(seed=123)  # other weights: everything must come from the file
    loaded = selact.load(fresh, path)
    assert loaded is fresh
    assert selective_configs(loaded) == selective_configs(model)
    layers, expected = selective(loaded), selective(model)
    assert sorted(layers) == ["0", "2", "4"]
    assert layers["0"].config == selact.SelectiveConfig(
        strategy="sapw", density=0.25, granularity="block", block=4, budget="threshold"
    )
    assert layers["2"].config.density == 0.35 and layers["2"].config.budget == "topk"
    # the exact name's fields apply to the default, not on top of the regex's
    assert layers["4"].config == selact.SelectiveConfig(
        strategy="random", density=0.5, budget="threshold"
    )
    assert type(loaded[6]) is nn.Linear  # the override None left the classifier dense
    for name, layer in layers.items():
        torch.testing.assert_close(layer.threshold, expected[name].threshold, rtol=0, atol=0)
    assert torch.isfinite(layers["0"].threshold)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    for x in data("mlp", seed=7):
        torch.manual_seed(5)  # the random layer draws its mask from the global generator
        want = model(x)
        torch.manual_seed(5)
        assert torch.equal(loaded(x), want)


def test_cnn_round_trip_reproduces_outputs(tmp_path):
    model = calibrated_cnn()
    path = selact.save(model, tmp_path / "cnn.safetensors")
    loaded = selact.load(cnn(seed=99), path)
    assert selective_configs(loaded) == selective_configs(model)
    assert sorted(selective(loaded)) == ["2", "4"]  # first conv and classifier stay dense
    assert selective(loaded)["2"].config.strategy == "sapw"
    for x in data("cnn", seed=7):
        assert torch.equal(loaded(x), model(x))


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_attention_round_trip_reproduces_outputs(tmp_path):
    # MultiheadAttention's in-projection is a selective layer without a module of its own in the
    # dense model: it must not count as a conversion that load has to redo (a bug found when the
    # VOC sweep loaded a fine-tuned detector).
    torch.manual_seed(0)
    model = selact.sparsify(
        AttentionBlock(),
        strategy="sapw",
        density=0.3,
        filter_fn=lambda module, name: isinstance(module, nn.MultiheadAttention | nn.Linear),
    ).eval()
    path = selact.save(model, tmp_path / "attn.safetensors")
    loaded = selact.load(AttentionBlock(), path).eval()
    assert selective_configs(loaded) == selective_configs(model)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_round_trip_of_a_dense_model(tmp_path):
    model = mlp(seed=0)
    path = selact.save(model, tmp_path / "dense.safetensors")
    loaded = selact.load(mlp(seed=1), path)
    assert not selective(loaded)
    x = data("mlp", n=1)[0]
    assert torch.equal(loaded(x), model(x))


def test_loaded_model_densifies_to_the_saved_weights(tmp_path):
    model = calibrated_mlp()
    path = selact.save(model, tmp_path / "m.safetensors")
    dense = selact.densify(selact.load(mlp(seed=3), path))
    assert all(not isinstance(m, SelectiveModule) for m in dense.modules())
    reference = mlp(seed=0)
    for key, value in reference.state_dict().items():
        assert torch.equal(dense.state_dict()[key], value), key


def test_save_creates_missing_folders_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "m.safetensors"
    selact.save(calibrated_mlp(), path)
    model = selact.sparsify(mlp(seed=4), density=0.9)
    selact.save(model, path)
    loaded = selact.load(mlp(seed=0), path)
    assert selective_configs(loaded) == selective_configs(model)


# --- atomic writes ----------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path):
    selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def _failing_save_model(model, filename, metadata=None, **kwargs):
    with open(filename, "wb") as f:  # a partial write, then the failure
        f.write(b"partial")
    raise OSError("disk full")


def test_failing_save_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_model", _failing_save_model)
    with pytest.raises(OSError, match="disk full"):
        selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(model, filename, metadata=None, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = calibrated_mlp()
    selact.save(model, path)
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_model", _failing_save_model)
    with pytest.raises(OSError):
        selact.save(selact.sparsify(mlp(seed=5), density=0.2), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
    monkeypatch.undo()
    x = data("mlp", n=1)[0]
    torch.manual_seed(0)
    want = model(x)
    torch.manual_seed(0)
    assert torch.equal(selact.load(mlp(seed=8), path)(x), want)


def test_saved_file_has_the_permissions_of_an_ordinary_file(tmp_path):
    # A checkpoint should be readable as any file the user writes (0o666 less the umask), not
    # private to its owner: tempfile.mkstemp creates 0o600 files, and os.replace keeps that mode.
    umask = os.umask(0o022)
    os.umask(umask)
    path = selact.save(selact.sparsify(mlp(), density=0.5), tmp_path / "m.safetensors")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~umask


# --- errors -----------------------------------------------------------------------------------


def test_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as info:
        selact.load(mlp(), path)
    assert str(path) in str(info.value)


def test_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        selact.load(mlp(), tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, "random"], ids=["empty", "short", "random"])
def test_corrupt_file_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content == "random":
        content = bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist())
    path.write_bytes(content)
    model = mlp()
    with pytest.raises(ValueError) as info:
        selact.load(model, path)
    assert str(path) in str(info.value)
    assert not selective(model)


def test_truncated_checkpoint_is_a_value_error_naming_it(tmp_path):
    path = selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError) as info:
        selact.load(mlp(), path)
    assert str(path) in str(info.value)


def test_plain_safetensors_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_model(mlp(), str(path))
    with pytest.raises(ValueError, match="not a valid selact checkpoint") as info:
        selact.load(mlp(), path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "metadata",
    [
        {"format": "pt"},
        {"selact": "{not json"},
        {"selact": "[1, 2]"},
        {"selact": '{"format": 1, "converted": {}}'},
        {"selact": '{"format": 1, "converted": {"0": {"densty": 0.5}}, "layers": {}}'},
        {"selact": '{"format": 1, "converted": {"0": {"density": 7}}, "layers": {}}'},
    ],
    ids=["other-metadata", "bad-json", "not-a-dict", "no-layers", "unknown-field", "bad-density"],
)
def test_bad_selact_metadata_is_a_value_error_naming_the_file(tmp_path, metadata):
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_model(mlp(), str(path), metadata=metadata)
    model = mlp()
    with pytest.raises(ValueError) as info:
        selact.load(model, path)
    assert str(path) in str(info.value)
    assert not selective(model)


def test_loading_into_an_already_sparsified_model_raises(tmp_path):
    path = selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match="already sparsified"):
        selact.load(selact.sparsify(mlp(), density=0.5), path)


def _wider():
    return mlp(hidden=32)


def _shorter():
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh())


def _longer():
    return nn.Sequential(*mlp(), nn.Linear(5, 5))


def _conv_first():
    return nn.Sequential(nn.Conv2d(12, 24, 1), *list(mlp())[1:])


ARCHITECTURES = {
    # make, what the error must mention
    "wider": (_wider, "0.weight"),
    "longer": (_longer, "7.weight"),
    "shorter": (_shorter, "'2'"),
    "conv-in-place-of-linear": (_conv_first, "0.weight"),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_loading_into_another_architecture_is_a_clear_error(tmp_path, arch):
    make, culprit = ARCHITECTURES[arch]
    path = selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    with pytest.raises((ValueError, RuntimeError)) as info:
        selact.load(make(), path)
    assert culprit in str(info.value)


@pytest.mark.parametrize("arch", ["wider", "shorter"])
def test_architecture_mismatch_error_names_the_checkpoint(tmp_path, arch):
    # Every other load error names the file; these come from load_state_dict (a RuntimeError)
    # and from sparsify's override check ("override '2' names no layer of the model": the user
    # passed no override).
    path = selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    with pytest.raises(ValueError) as info:
        selact.load(ARCHITECTURES[arch][0](), path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("arch", ["longer", "conv-in-place-of-linear"])
def test_failed_load_leaves_the_model_as_it_was(tmp_path, arch):
    # load() sparsifies the model before it knows whether the weights fit; on failure the
    # caller is left with a half-converted model (a Conv2d converted with a Linear's config).
    path = selact.save(calibrated_mlp(), tmp_path / "m.safetensors")
    model = ARCHITECTURES[arch][0]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError)):
        selact.load(model, path)
    assert not selective(model), "a failed load left the model converted"
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
