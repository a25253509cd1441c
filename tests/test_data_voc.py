"""VOC loading (layouts, archive, errors that name the file), augmentation and batching."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from selact.data.voc import (
    CLASSES,
    VOCDataset,
    collate,
    eval_transform,
    find_voc,
    letterbox_factors,
    read_annotation,
    train_transform,
)
from tests import voc_tree

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SELACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SELACT_DATA", raising=False)


@pytest.fixture
def tree(tmp_path) -> Path:
    return voc_tree.make_tree(tmp_path / "voc")


def test_reads_boxes_labels_difficult(tree):
    ds = VOCDataset(tree, "train")
    assert len(ds) == 8 and ds.year == "2007"
    record = ds.records[3]
    xml = (tree / "VOCdevkit/VOC2007/Annotations" / f"{record.image_id}.xml").read_text()
    first = xml.split("<bndbox>")[1]
    corners = [
        float(first.split(f"<{k}>")[1].split("<")[0]) for k in ("xmin", "ymin", "xmax", "ymax")
    ]
    # 1-based inclusive corners become 0-based continuous xyxy
    assert record.boxes[0].tolist() == [corners[0] - 1, corners[1] - 1, corners[2], corners[3]]
    assert record.labels.tolist() == [6, 14] and record.difficult.tolist() == [False, True]
    image, target = ds[3]
    assert image.shape == (3, record.height, record.width) and image.dtype == torch.uint8
    assert torch.equal(target["boxes"].as_subclass(torch.Tensor), record.boxes)
    # the painted rectangle is where the box says
    x1, y1, x2, y2 = record.boxes[0].int().tolist()
    patch = image[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].float().mean((1, 2))
    assert patch[0] > 150 and patch[1] < 90  # red: class 6 ("car") in the palette


def test_finds_every_layout(tree, tmp_path, monkeypatch):
    assert find_voc(tree) == (tree, "2007")
    assert find_voc(tree / "VOCdevkit") == (tree, "2007")
    monkeypatch.setenv("SELACT_DATA", str(tree))
    assert find_voc() == (tree, "2007")
    archive = tmp_path / "shared" / "voc2007-test-256.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "VOCdevkit", arcname="VOCdevkit")
    for given in (archive, archive.parent):
        root, year = find_voc(given)
        assert year == "2007" and root.is_relative_to(tmp_path / "cache")
    assert len(VOCDataset(archive.parent, "val")) == 4


def test_2012_and_several_years(tmp_path):
    voc_tree.make_tree(tmp_path / "v", year="2012")
    ds = VOCDataset(tmp_path / "v", "trainval")
    assert ds.year == "2012" and len(ds) == 12
    voc_tree.make_tree(tmp_path / "v", year="2007")
    with pytest.raises(ValueError, match="several VOC years"):
        find_voc(tmp_path / "v")
    assert len(VOCDataset(tmp_path / "v", "val", year="2012")) == 4
    with pytest.raises(ValueError, match="image set"):
        VOCDataset(tmp_path / "v", "test", year="2012")  # VOC2012 has no test set


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VOC data given"):
        find_voc()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no VOCdevkit"):
        find_voc(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_voc(tmp_path / "nowhere")


def _annotation(tree: Path, image_id: str = "000001") -> Path:
    return tree / "VOCdevkit/VOC2007/Annotations" / f"{image_id}.xml"


def test_bad_xml_names_the_file(tree):
    path = _annotation(tree)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match=r"000001\.xml: malformed annotation XML"):
        VOCDataset(tree, "train")


def test_missing_image_names_the_file(tree):
    (tree / "VOCdevkit/VOC2007/JPEGImages/000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000002\.jpg: image listed in the VOC train"):
        VOCDataset(tree, "train")


@pytest.mark.parametrize(
    ("box", "size"),
    [((0, 5, 20, 20), (64, 64)), ((5, 5, 70, 20), (64, 64)), ((30, 5, 20, 20), (64, 64))],
)
def test_box_outside_image_names_the_file(tmp_path, box, size):
    path = tmp_path / "x.xml"
    path.write_text(voc_tree.xml("x", *size, [("dog", box, False)]))
    with pytest.raises(ValueError, match=r"x\.xml: object 0 \(dog\) box .* outside the 64x64"):
        read_annotation(path)


def test_other_annotation_errors(tmp_path):
    path = tmp_path / "y.xml"
    path.write_text(voc_tree.xml("y", 64, 64, [("unicorn", (1, 1, 5, 5), False)]))
    with pytest.raises(ValueError, match=r"y\.xml: object 0 has unknown class 'unicorn'"):
        read_annotation(path)
    path.write_text("<annotation><object><name>dog</name></object></annotation>")
    with pytest.raises(ValueError, match=r"y\.xml: annotation has no <size>"):
        read_annotation(path)
    path.write_text(voc_tree.xml("y", 64, 64, []).replace("<width>64", "<width>wide"))
    with pytest.raises(ValueError, match=r"y\.xml: <width> is not a number"):
        read_annotation(path)


def test_image_size_mismatch_names_both_files(tree):
    path = _annotation(tree, "000003")
    path.write_text(path.read_text().replace("<width>", "<width>1"))
    ds = VOCDataset(tree, "train")
    with pytest.raises(ValueError, match=r"000003\.jpg: image is .* but .*000003\.xml says"):
        ds[3]


def test_letterbox_eval_maps_back(tree):
    ds = VOCDataset(tree, "val", transform=eval_transform(64))
    for i in range(len(ds)):
        image, target = ds[i]
        record = ds.records[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        _, _, sy, sx = letterbox_factors(record.height, record.width, 64)
        back = target["boxes"].as_subclass(torch.Tensor) / torch.tensor([sx, sy, sx, sy])
        torch.testing.assert_close(back, record.boxes, atol=1e-3, rtol=0)


def test_train_transform_keeps_boxes_valid(tree):
    torch.manual_seed(0)
    ds = VOCDataset(tree, "trainval", transform=train_transform(64, crop_p=1.0))
    for _ in range(3):
        for i in range(len(ds)):
            image, target = ds[i]
            boxes = target["boxes"].as_subclass(torch.Tensor)
            assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
            assert len(boxes) == len(target["labels"]) == len(target["difficult"])
            assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
            assert (boxes >= 0).all() and (boxes <= 64).all()
            assert set(target["labels"].tolist()) <= {6, 14, 11}


def test_collate(tree):
    ds = VOCDataset(tree, "train", transform=eval_transform(64))
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and type(images) is torch.Tensor
    assert type(targets[0]["boxes"]) is torch.Tensor and targets[1]["index"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_real_archive_splits(monkeypatch):
    monkeypatch.delenv("SELACT_CACHE")  # reuse the machine's cache: unpacking takes seconds
    train, val = VOCDataset(SHARED_DATA, "train"), VOCDataset(SHARED_DATA, "val")
    assert (len(train), len(val)) == (3961, 991)
    assert not {r.image_id for r in train.records} & {r.image_id for r in val.records}
    objects = sum(len(r.labels) for r in train.records + val.records)
    difficult = sum(int(r.difficult.sum()) for r in train.records + val.records)
    assert (objects, difficult) == (14976, 2944)
    assert max(max(r.width, r.height) for r in val.records) == 256
    assert len(CLASSES) == 20
