"""A tiny synthetic VOCdevkit tree for tests: coloured rectangles on a grey background, one
object class per colour, with XML annotations in the official layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from selact.data.voc import CLASSES

# (class index, colour) pairs: a few classes are enough for the pipeline
PALETTE = ((6, (220, 30, 30)), (14, (30, 200, 40)), (11, (40, 60, 230)))


def xml(image_id, width, height, objects, year="2007") -> str:
    """An annotation in the VOC format; objects are (name, (xmin, ymin, xmax, ymax), difficult)."""
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin>"
        f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
        for name, box, difficult in objects
    )
    return (
        f"<annotation><folder>VOC{year}</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{body}</annotation>"
    )


def jpeg(width, height, boxes_colours) -> bytes:
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    for (x1, y1, x2, y2), colour in boxes_colours:
        pixels[y1 - 1 : y2, x1 - 1 : x2] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def make_tree(
    root: Path, n_train: int = 8, n_val: int = 4, year: str = "2007", seed: int = 0
) -> Path:
    """Write ``root/VOCdevkit/VOC<year>`` with train, val (and test = both) image sets."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n_train + n_val)]
    for i, image_id in enumerate(ids):
        width, height = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        objects, painted = [], []
        for k in range(1 + i % 2):
            label, colour = PALETTE[(i + k) % len(PALETTE)]
            w, h = int(rng.integers(12, width // 2)), int(rng.integers(12, height // 2))
            x1 = int(rng.integers(1, width - w)) if k == 0 else width - w
            y1 = int(rng.integers(1, height - h)) if k == 0 else height - h
            box = (x1, y1, x1 + w - 1, y1 + h - 1)
            objects.append((CLASSES[label], box, i % 4 == 3 and k == 1))
            painted.append((box, colour))
        (base / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg(width, height, painted))
        (base / "Annotations" / f"{image_id}.xml").write_text(
            xml(image_id, width, height, objects, year)
        )
    sets = {"train": ids[:n_train], "val": ids[n_train:], "trainval": ids, "test": ids}
    for name, members in sets.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{m}\n" for m in members))
    return root
