"""CIFAR-10 loading (all layouts, caching, errors), the validation split, and tensor batching."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from selact._files import atomic_torch_save, atomic_write, atomic_write_text
from selact.data import (
    CLASSES,
    MEAN,
    STD,
    BatchLoader,
    load_cifar10,
    normalize,
    random_crop_flip,
    split_indices,
)
from selact.data import cifar10 as cifar10_module
from selact.data.paths import data_root, unpack_archive

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PER_CLASS = {"train": 4, "test": 2}  # images per class in the synthetic tree


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own cache folder and no $SELACT_DATA."""
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELACT_DATA", raising=False)


def _image(label: int, index: int) -> torch.Tensor:
    """A 32x32 image whose mean colour encodes (label, index), so decoding order can be checked."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[0] = 20 * label + 10
    image[1] = 40 * index + 10
    image[2, :16] = 200
    return image


def _jpeg(image: torch.Tensor, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_tree(root: Path) -> Path:
    for split, n in PER_CLASS.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i:04d}.jpg").write_bytes(_jpeg(_image(label, i)))
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _write_tree(tmp_path / "cifar")


@pytest.fixture
def archive_dir(tmp_path) -> Path:
    """A folder holding cifar10-jpeg.tar.gz made from the synthetic tree."""
    source = _write_tree(tmp_path / "src")
    folder = tmp_path / "archive"
    folder.mkdir()
    with tarfile.open(folder / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        for split in PER_CLASS:
            tar.add(source / split, arcname=split)
    return folder


def _check_synthetic(images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
    n = PER_CLASS[split]
    assert images.shape == (10 * n, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert labels.tolist() == [c for c in range(10) for _ in range(n)]
    for k in (0, len(labels) - 1):  # JPEG is lossy: compare mean colours
        expected = _image(int(labels[k]), k % n).float().mean((1, 2))
        assert torch.allclose(images[k].float().mean((1, 2)), expected, atol=3)


@pytest.mark.parametrize("split", ["train", "test"])
def test_tree_layout(tree, split):
    _check_synthetic(*load_cifar10(tree, split), split)


def test_tree_one_folder_down(tree):
    images, labels = load_cifar10(tree.parent, "test")
    _check_synthetic(images, labels, "test")


def test_two_trees_one_folder_down_are_ambiguous(tree):
    _write_tree(tree.parent / "other")
    with pytest.raises(ValueError, match="several train/ test/ trees"):
        load_cifar10(tree.parent, "test")


def test_archive_unpacked_once_and_cached(archive_dir, monkeypatch):
    first = load_cifar10(archive_dir, "test")
    _check_synthetic(*first, "test")
    cache = Path(os.environ["SELACT_CACHE"])
    assert len(list((cache / "cifar10").glob("*-test-v*.pt"))) == 1
    assert not list(cache.glob(".*")), "a temporary file or folder was left behind"

    def fail(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cifar10_module, "_decode", fail)
    monkeypatch.setattr(cifar10_module, "unpack_archive", fail)
    second = load_cifar10(archive_dir / "cifar10-jpeg.tar.gz", "test")  # the file itself works too
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_archive_cache_miss_reuses_unpacked_tree(archive_dir, monkeypatch):
    load_cifar10(archive_dir, "test")

    def fail(*args, **kwargs):
        raise AssertionError("unpacked again")

    monkeypatch.setattr(tarfile, "open", fail)
    _check_synthetic(*load_cifar10(archive_dir, "train"), "train")


def test_corrupt_cache_is_rebuilt(tree, caplog):
    load_cifar10(tree, "test")
    [cached] = (Path(os.environ["SELACT_CACHE"]) / "cifar10").glob("*.pt")
    cached.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        _check_synthetic(*load_cifar10(tree, "test"), "test")
    assert str(cached) in caplog.text


def test_changed_tree_is_decoded_again(tree):
    before, _ = load_cifar10(tree, "test")
    path = tree / "test" / "cat" / "0000.jpg"
    path.write_bytes(_jpeg(torch.full((3, 32, 32), 255, dtype=torch.uint8)))
    after, _ = load_cifar10(tree, "test")
    k = CLASSES.index("cat") * PER_CLASS["test"]
    assert not torch.equal(before[k], after[k]) and after[k].float().mean() > 250


def test_data_env_variable(tree, monkeypatch):
    monkeypatch.setenv("SELACT_DATA", str(tree))
    _check_synthetic(*load_cifar10(None, "test"), "test")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar10(tmp_path / "nowhere", "test")


def test_folder_without_data_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*cifar10-jpeg\.tar\.gz"):
        load_cifar10(tmp_path / "empty", "test")


def test_nothing_given_and_no_download(monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"SELACT_DATA.*--download"):
        load_cifar10(None, "test")


def test_missing_class_folder_is_named(tree):
    (tree / "test" / "frog").rename(tree / "test" / "frogs")
    with pytest.raises(FileNotFoundError, match=r"test.frog: missing class folder"):
        load_cifar10(tree, "test")


def test_corrupt_jpeg_is_named(tree):
    (tree / "test" / "dog" / "0001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"dog.0001\.jpg: not a readable JPEG"):
        load_cifar10(tree, "test")


def test_wrong_image_size_is_named(tree):
    big = torch.zeros(3, 40, 32, dtype=torch.uint8)
    (tree / "test" / "ship" / "0000.jpg").write_bytes(_jpeg(big))
    with pytest.raises(ValueError, match=r"ship.0000\.jpg: expected a 32x32 RGB image, got 32x40"):
        load_cifar10(tree, "test")


def test_damaged_archive_is_named(tmp_path):
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(ValueError, match=r"cifar10-jpeg\.tar\.gz: cannot unpack"):
        load_cifar10(tmp_path, "test")
    assert not list(Path(os.environ["SELACT_CACHE"]).glob("*/")), "a partial tree was left behind"


def test_archive_escaping_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ValueError, match="evil.tar.gz: cannot unpack"):
        unpack_archive(archive, tmp_path / "dest" / "inner")
    assert not (tmp_path / "dest" / "outside.txt").exists()
    assert not (tmp_path / "dest" / "inner").exists()


def test_broken_torchvision_layout_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(folder, "train")


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_cifar10(None, "validation")


def test_val_needs_val_size(tree):
    with pytest.raises(ValueError, match="val_size"):
        load_cifar10(tree, "val")


def test_val_split_from_loader(tree):
    train_images, train_labels = load_cifar10(tree, "train", val_size=10, seed=3)
    val_images, val_labels = load_cifar10(tree, "val", val_size=10, seed=3)
    all_images, _ = load_cifar10(tree, "train")
    assert len(train_labels) == 30 and len(val_labels) == 10
    assert val_labels.bincount(minlength=10).tolist() == [1] * 10
    rows = {tuple(x.flatten().tolist()) for x in all_images}
    assert len(rows) == 40  # the synthetic images are all different
    train_rows = {tuple(x.flatten().tolist()) for x in train_images}
    val_rows = {tuple(x.flatten().tolist()) for x in val_images}
    assert not train_rows & val_rows and train_rows | val_rows == rows


def test_split_indices_balanced_disjoint_and_seeded():
    labels = torch.arange(10).repeat_interleave(500)[torch.randperm(5000)]
    train, val = split_indices(labels, 1003, seed=7)
    assert len(val) == 1003 and len(train) == 5000 - 1003
    assert torch.cat([train, val]).sort().values.equal(torch.arange(5000))
    counts = labels[val].bincount(minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(split_indices(labels, 1003, seed=7)[1], val)
    assert not torch.equal(split_indices(labels, 1003, seed=8)[1], val)
    assert torch.equal(train, train.sort().values)


def test_split_indices_rejects_bad_sizes():
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="val_size"):
        split_indices(labels, 4)
    with pytest.raises(ValueError, match="class 1, which has 1"):
        split_indices(torch.tensor([0, 0, 0, 0, 1]), 4)


def test_normalize_matches_torchvision():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    expected = TF.normalize(images.float() / 255, list(MEAN), list(STD))
    torch.testing.assert_close(normalize(images), expected)


def test_random_crop_flip_is_a_padded_crop():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for k in range(len(images)):
        candidates = [
            (padded[k, :, dy : dy + 32, dx : dx + 32], flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
        ]
        matches = [f for c, f in candidates if torch.equal(c.flip(-1) if f else c, out[k])]
        assert matches, f"image {k} is not a crop of its padded original"
        flips += matches[0]
    assert 10 < flips < 54  # about half are flipped


def test_random_crop_flip_without_padding():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(1), padding=0)
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()


def test_batch_loader_order_and_determinism():
    images = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 2, 2).to(torch.uint8).contiguous()
    labels = torch.arange(10)
    plain = list(BatchLoader(images, labels, 4))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    assert torch.cat([y for _, y in plain]).tolist() == list(range(10))
    assert plain[0][0].dtype == torch.float32
    assert len(BatchLoader(images, labels, 4, drop_last=True)) == 2

    loader = BatchLoader(images, labels, 3, shuffle=True, seed=5)
    epoch1 = torch.cat([y for _, y in loader])
    epoch2 = torch.cat([y for _, y in loader])
    assert sorted(epoch1.tolist()) == list(range(10)) and not torch.equal(epoch1, epoch2)
    again = BatchLoader(images, labels, 3, shuffle=True, seed=5)
    assert torch.equal(torch.cat([y for _, y in again]), epoch1)
    for x, y in BatchLoader(images, labels, 3, shuffle=True, seed=5):  # images follow labels
        torch.testing.assert_close(x, normalize(images[y]))


def test_batch_loader_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))


def test_atomic_writes(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "out.json", "{}\n")
    assert path.read_text() == "{}\n"
    atomic_torch_save(tmp_path / "t.pt", {"x": torch.ones(2)})
    assert torch.load(tmp_path / "t.pt")["x"].sum() == 2

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "t.pt", crash)
    assert torch.load(tmp_path / "t.pt")["x"].sum() == 2  # the old file is untouched
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out.json", "sub", "t.pt"]


def test_data_root_precedence(tmp_path, monkeypatch):
    assert data_root(None) is None
    monkeypatch.setenv("SELACT_DATA", str(tmp_path))
    assert data_root(None) == tmp_path
    (tmp_path / "given").mkdir()
    assert data_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setenv("SELACT_DATA", str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=r"typo: \$SELACT_DATA does not exist"):
        data_root(None)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole session (same path in test_demo), so the real archive is
    unpacked and decoded once per session."""
    path = tmp_path_factory.getbasetemp() / "selact-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason="no ../shared/data")
def test_shared_archive_test_split(shared_cache, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(shared_cache))
    images, labels = load_cifar10(SHARED_DATA, "test")
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [1000] * 10
    jpeg = _member(SHARED_DATA / "cifar10-jpeg.tar.gz", "test/airplane/0000.jpg")
    first = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert torch.equal(images[0], first.permute(2, 0, 1))
    assert 100 < images.float().mean() < 140  # natural images, not blank


def _member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()
