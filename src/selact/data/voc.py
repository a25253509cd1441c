"""Pascal VOC detection: any standard VOCdevkit tree (2007 to 2012) as images, boxes, labels
and difficult flags, with letterboxed detection augmentation from torchvision's transforms v2.

Layouts read: the project's archive (``voc2007-test-256.tar.gz``, unpacked once into the cache
folder), a folder holding that archive, a folder holding ``VOCdevkit/``, or ``VOCdevkit/``
itself. File lists come from :class:`torchvision.datasets.VOCDetection` and annotations are
parsed with its ``parse_voc_xml``; on top of it every annotation is checked when the data set
is opened, so bad XML, an unknown class, a missing image or a box outside its image is a
``ValueError`` (``FileNotFoundError`` for a missing file) that names the file.

Boxes: VOC stores 1-based inclusive pixel corners; here they are continuous 0-based ``xyxy``
(``xmin - 1, ymin - 1, xmax, ymax``), so a box's width is ``xmax - xmin + 1`` as in the VOC
devkit and the devkit's "+1" IoU equals the plain IoU of these boxes.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

from selact.data.paths import data_root, unpack_archive

__all__ = [
    "CLASSES",
    "ARCHIVE_NAME",
    "VOCRecord",
    "VOCDataset",
    "Letterbox",
    "find_voc",
    "read_annotation",
    "letterbox_factors",
    "train_transform",
    "eval_transform",
    "collate",
]

log = logging.getLogger(__name__)

#: The 20 VOC classes in the standard (devkit) order; labels are indices into this tuple.
CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
ARCHIVE_NAME = "voc2007-test-256.tar.gz"
YEARS = tuple(str(y) for y in range(2007, 2013))
#: ImageNet mean in uint8 units: the letterbox border, which normalises to about zero.
PAD_FILL = (124, 116, 104)
_INDEX = {name: i for i, name in enumerate(CLASSES)}


@dataclass(frozen=True)
class VOCRecord:
    """One annotated image: boxes are float32 ``(N, 4)`` 0-based xyxy (see the module doc)."""

    image_id: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor  # int64 indices into CLASSES
    difficult: torch.Tensor  # bool

    def target(self) -> dict[str, Any]:
        """The ground truth as a dict of tensors (a copy), as :mod:`selact.metrics` reads it."""
        return {
            "boxes": self.boxes.clone(),
            "labels": self.labels.clone(),
            "difficult": self.difficult.clone(),
        }


def _is_devkit_parent(path: Path) -> bool:
    return any((path / "VOCdevkit" / f"VOC{y}").is_dir() for y in YEARS)


def find_voc(
    data: str | os.PathLike[str] | None = None, year: str | None = None
) -> tuple[Path, str]:
    """The folder that holds ``VOCdevkit/VOC<year>`` and the year, from ``data`` or
    ``$SELACT_DATA`` (an archive, a folder holding it, a folder holding ``VOCdevkit`` or
    ``VOCdevkit`` itself). Archives are unpacked once into the cache folder.

    ``year=None`` picks the one year present and refuses to guess between several.
    """
    root = data_root(data)
    if root is None:
        raise FileNotFoundError(
            "no VOC data given: pass a data path or set $SELACT_DATA (a folder holding "
            f"{ARCHIVE_NAME} or a VOCdevkit tree)"
        )
    if root.is_file():
        root = unpack_archive(root)
    elif root.name == "VOCdevkit":
        root = root.parent
    elif not _is_devkit_parent(root) and (root / ARCHIVE_NAME).is_file():
        root = unpack_archive(root / ARCHIVE_NAME)
    if not _is_devkit_parent(root):
        raise FileNotFoundError(
            f"{root}: no VOCdevkit/VOC<year> folder (expected a VOCdevkit tree or {ARCHIVE_NAME})"
        )
    years = [y for y in YEARS if (root / "VOCdevkit" / f"VOC{y}").is_dir()]
    if year is None:
        if len(years) > 1:
            raise ValueError(f"{root}: several VOC years ({', '.join(years)}); choose one")
        year = years[0]
    elif str(year) not in years:
        raise FileNotFoundError(f"{root}: no VOCdevkit/VOC{year} (found {', '.join(years)})")
    return root, str(year)


def _field(node: dict, key: str, path: Path) -> Any:
    if not isinstance(node, dict) or key not in node:
        raise ValueError(f"{path}: annotation has no <{key}>")
    return node[key]


def _number(value: Any, key: str, path: Path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: <{key}> is not a number: {value!r}") from None


def read_annotation(path: Path) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parse one VOC XML file into (width, height, boxes, labels, difficult), checked.

    Raises a ``ValueError`` naming ``path`` for malformed XML, missing fields, unknown classes and
    boxes that are empty or outside the image.
    """
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise ValueError(f"{path}: malformed annotation XML ({err})") from None
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read annotation ({err})") from None
    ann = VOCDetection.parse_voc_xml(tree.getroot()).get("annotation")
    size = _field(ann, "size", path)
    width = int(_number(_field(size, "width", path), "width", path))
    height = int(_number(_field(size, "height", path), "height", path))
    if width < 1 or height < 1:
        raise ValueError(f"{path}: image size {width}x{height} is empty")
    objects = ann.get("object", [])
    objects = objects if isinstance(objects, list) else [objects]
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(objects):
        name = str(_field(obj, "name", path)).strip()
        if name not in _INDEX:
            raise ValueError(f"{path}: object {i} has unknown class {name!r}")
        bndbox = _field(obj, "bndbox", path)
        x1, y1, x2, y2 = (_number(_field(bndbox, k, path), k, path) for k in _CORNERS)
        if not (1 <= x1 <= x2 <= width and 1 <= y1 <= y2 <= height):
            raise ValueError(
                f"{path}: object {i} ({name}) box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty or "
                f"outside the {width}x{height} image (VOC corners are 1-based and inclusive)"
            )
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        labels.append(_INDEX[name])
        difficult.append(str(obj.get("difficult", "0")).strip() == "1")
    return (
        width,
        height,
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(difficult, dtype=torch.bool),
    )


_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _records(root: Path, year: str, image_set: str) -> list[VOCRecord]:
    try:
        listing = VOCDetection(str(root), year=year, image_set=image_set)
    except (RuntimeError, FileNotFoundError) as err:
        split = root / "VOCdevkit" / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt"
        raise FileNotFoundError(f"{split}: cannot open the VOC {image_set} list ({err})") from None
    except ValueError as err:
        raise ValueError(f"{root}: VOC{year} has no image set {image_set!r} ({err})") from None
    records = []
    for image, annotation in zip(listing.images, listing.annotations, strict=True):
        image, annotation = Path(image), Path(annotation)
        if not image.is_file():
            raise FileNotFoundError(f"{image}: image listed in the VOC {image_set} set is missing")
        width, height, boxes, labels, difficult = read_annotation(annotation)
        records.append(
            VOCRecord(image.stem, image, annotation, width, height, boxes, labels, difficult)
        )
    return records


def decode_image(record: VOCRecord) -> torch.Tensor:
    """The record's image as a ``(3, H, W)`` uint8 tensor; its size must match the XML's."""
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    try:
        with Image.open(record.image_path) as image:
            pixels = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{record.image_path}: not a readable image ({err})") from err
    height, width = pixels.shape[:2]
    if (width, height) != (record.width, record.height):
        raise ValueError(
            f"{record.image_path}: image is {width}x{height} but {record.annotation_path} says "
            f"{record.width}x{record.height}"
        )
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class VOCDataset(torch.utils.data.Dataset):
    """One image set of a VOCdevkit tree; items are ``(image, target)`` after ``transform``.

    Args:
        data: see :func:`find_voc`.
        image_set: ``"train"``, ``"val"``, ``"trainval"`` or (VOC2007) ``"test"``.
        year: ``None`` for the one year present.
        transform: ``transform(image, target)`` (a transforms v2 pipeline, see
            :func:`train_transform`); ``None`` returns the uint8 image and raw target.
        limit: keep only the first ``limit`` images of the set (smoke runs and tests).

    An item's target holds ``boxes`` (``tv_tensors.BoundingBoxes``, xyxy), ``labels``,
    ``difficult`` and ``index`` (the record's position, to look up the untransformed truth).
    """

    def __init__(
        self,
        data: str | os.PathLike[str] | None,
        image_set: str,
        year: str | None = None,
        transform: Callable | None = None,
        limit: int | None = None,
    ) -> None:
        self.root, self.year = find_voc(data, year)
        self.image_set = image_set
        self.records = _records(self.root, self.year, image_set)
        if limit is not None:
            self.records = self.records[:limit]
        if not self.records:
            raise ValueError(f"{self.root}: the VOC{self.year} {image_set} set is empty")
        self.transform = transform
        log.info("VOC%s %s: %d images", self.year, image_set, len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        record = self.records[index]
        image = tv_tensors.Image(decode_image(record))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                record.boxes.clone(), format="XYXY", canvas_size=(record.height, record.width)
            ),
            "labels": record.labels.clone(),
            "difficult": record.difficult.clone(),
            "index": index,
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """The untransformed ground truth of every image, in order (for the VOC metric)."""
        return [record.target() for record in self.records]


def letterbox_factors(height: int, width: int, size: int) -> tuple[int, int, float, float]:
    """``(new_h, new_w, sy, sx)``: the longer side becomes ``size``; ``sy = new_h / height``."""
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return new_h, new_w, new_h / height, new_w / width


class Letterbox(v2.Transform):
    """Resize so the longer side is ``size``, then pad right and bottom to ``size x size``.

    Padding at the far sides only keeps box coordinates a pure scaling, so detections map back
    to the original image by :func:`letterbox_factors`.
    """

    def __init__(self, size: int, fill: Sequence[int] = PAD_FILL) -> None:
        super().__init__()
        self.size = size
        self.fill = list(fill)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        new_h, new_w, _, _ = letterbox_factors(height, width, self.size)
        return {"shape": [new_h, new_w], "pad": [0, 0, self.size - new_w, self.size - new_h]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image | tv_tensors.BoundingBoxes):
            return inpt
        out = TF.resize(inpt, params["shape"], antialias=True)
        fill = self.fill if isinstance(inpt, tv_tensors.Image) else None
        return TF.pad(out, params["pad"], fill=fill)


def _labels_and_difficult(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    target = inputs[1] if isinstance(inputs, tuple | list) and len(inputs) > 1 else inputs
    return target["labels"], target["difficult"]


def train_transform(size: int, crop_p: float = 0.5) -> v2.Compose:
    """Photometric distortion, an SSD-style IoU crop (with probability ``crop_p``) that keeps
    boxes valid, horizontal flip, letterbox to ``size``; boxes that become degenerate are dropped
    with their labels and difficult flags; float images in [0, 1]."""
    return v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomApply([v2.RandomIoUCrop()], p=crop_p),
            v2.RandomHorizontalFlip(),
            Letterbox(size),
            v2.SanitizeBoundingBoxes(labels_getter=_labels_and_difficult),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform(size: int) -> v2.Compose:
    """Letterbox to ``size`` and float images in [0, 1]."""
    return v2.Compose([Letterbox(size), v2.ToDtype(torch.float32, scale=True)])


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack letterboxed images into ``(B, 3, S, S)``; targets stay a list of dicts of plain
    tensors (``boxes`` float32, ``labels`` int64, ``difficult`` bool, ``index`` int)."""
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in batch])
    targets = [
        {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"],
            "difficult": target["difficult"],
            "index": target["index"],
        }
        for _, target in batch
    ]
    return images, targets
