"""CIFAR-10 as uint8 tensors, a seeded validation split, and fast batches on tensors.

Three layouts are read: the project's JPEG archive (``cifar10-jpeg.tar.gz``), its unpacked tree
(``train/<class>/*.jpg`` and ``test/<class>/*.jpg``) and torchvision's pickled batches
(``cifar-10-batches-py/``). JPEGs are decoded once and the tensors cached, keyed by the archive's
content or by the tree's file listing, because decoding 60,000 files on every run would dominate
short experiments. Augmentation (4-pixel padded random crop, horizontal flip) and normalisation
run on whole batches of tensors, which on a CPU is far faster than per-image PIL transforms.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from selact._files import atomic_torch_save
from selact.data.paths import cache_dir, data_root, file_digest, unpack_archive

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "ARCHIVE_NAME",
    "TORCHVISION_FOLDER",
    "load_cifar10",
    "split_indices",
    "normalize",
    "random_crop_flip",
    "BatchLoader",
]

log = logging.getLogger(__name__)

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean and std of the CIFAR-10 training images, in [0, 1] units (the usual values).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
TORCHVISION_FOLDER = "cifar-10-batches-py"
SPLITS = ("train", "val", "test")
_IMAGE_SIZE = 32
_CACHE_VERSION = 1  # bump when the decoded format changes, so old caches are ignored


@dataclass(frozen=True)
class _Source:
    """A located copy of CIFAR-10: ``kind`` is "archive", "tree" or "torchvision"."""

    kind: str
    path: Path


def _is_tree(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _find_source(root: Path) -> _Source:
    """Recognise the layout at ``root`` (see the module docstring) or explain what was expected."""
    if root.is_file():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _Source("archive", root)
        raise ValueError(f"{root}: expected a CIFAR-10 archive (.tar.gz) or a folder")
    if _is_tree(root):
        return _Source("tree", root)
    if root.name == TORCHVISION_FOLDER:
        return _Source("torchvision", root.parent)
    if (root / TORCHVISION_FOLDER).is_dir():
        return _Source("torchvision", root)
    if (root / ARCHIVE_NAME).is_file():
        return _Source("archive", root / ARCHIVE_NAME)
    trees = sorted(p for p in root.iterdir() if p.is_dir() and _is_tree(p))
    if len(trees) > 1:
        names = ", ".join(p.name for p in trees)
        raise ValueError(f"{root}: several train/ test/ trees ({names}); give one of them")
    if trees:
        return _Source("tree", trees[0])
    raise FileNotFoundError(
        f"{root}: no CIFAR-10 found; expected {ARCHIVE_NAME}, a train/ and test/ tree of class "
        f"folders (here or one folder down), or torchvision's {TORCHVISION_FOLDER}/"
    )


def _split_files(tree: Path, split: str) -> list[tuple[Path, int]]:
    """Every (jpeg path, label) of one split, in class then file-name order."""
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASSES):
        folder = tree / split / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing class folder (expected {CLASSES})")
        jpegs = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not jpegs:
            raise FileNotFoundError(f"{folder}: class folder holds no .jpg files")
        files += [(p, label) for p in jpegs]
    return files


def _decode(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode JPEGs into (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    images = torch.empty(len(files), 3, _IMAGE_SIZE, _IMAGE_SIZE, dtype=torch.uint8)
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as image:
                size = image.size
                pixels = np.array(image.convert("RGB"))  # a writable copy
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{path}: not a readable JPEG ({err})") from err
        if size != (_IMAGE_SIZE, _IMAGE_SIZE):
            raise ValueError(f"{path}: expected a 32x32 RGB image, got {size[0]}x{size[1]}")
        images[i] = torch.from_numpy(pixels).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return images, labels


def _tree_key(files: list[tuple[Path, int]]) -> str:
    """A cache key from the tree's location, file names, sizes and modification times."""
    digest = hashlib.sha256(str(files[0][0].resolve().parents[2]).encode())
    for path, label in files:
        st = path.stat()
        digest.update(
            f"{path.parent.name}/{path.name}:{label}:{st.st_size}:{st.st_mtime_ns};".encode()
        )
    return digest.hexdigest()[:16]


def _cache_path(key: str, split: str) -> Path:
    return cache_dir() / "cifar10" / f"{key}-{split}-v{_CACHE_VERSION}.pt"


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached tensors at ``path``, or ``None`` (with a warning) if missing or unusable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        images, labels = blob["images"], blob["labels"]
        ok = (
            images.dtype == torch.uint8
            and images.shape[1:] == (3, _IMAGE_SIZE, _IMAGE_SIZE)
            and labels.dtype == torch.int64
            and labels.shape == images.shape[:1]
        )
    except Exception as err:  # a damaged cache is rebuilt, never fatal
        log.warning("%s: unreadable tensor cache, rebuilding (%s)", path, err)
        return None
    if not ok:
        log.warning("%s: tensor cache has unexpected shapes or dtypes, rebuilding", path)
        return None
    return images, labels


def _load_jpeg(source: _Source, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the JPEG archive or tree, decoded once and then read from the cache."""
    if source.kind == "archive":
        key = file_digest(source.path)
        cached = _read_cache(_cache_path(key, split))
        if cached is not None:
            return cached
        unpacked = unpack_archive(source.path)
        if not _is_tree(unpacked):
            trees = [p for p in unpacked.iterdir() if p.is_dir() and _is_tree(p)]
            if not trees:
                raise ValueError(f"{source.path}: archive holds no train/ and test/ class folders")
            unpacked = trees[0]
        files = _split_files(unpacked, split)
    else:
        files = _split_files(source.path, split)
        key = _tree_key(files)
        cached = _read_cache(_cache_path(key, split))
        if cached is not None:
            return cached
    log.info("decoding %d CIFAR-10 %s images from %s", len(files), split, source.path)
    images, labels = _decode(files)
    blob = {
        "images": images,
        "labels": labels,
        "classes": list(CLASSES),
        "source": str(source.path),
    }
    atomic_torch_save(_cache_path(key, split), blob)
    return images, labels


def _load_torchvision(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of torchvision's pickled CIFAR-10 below ``root`` (downloaded if asked)."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{root / TORCHVISION_FOLDER}: missing or corrupt torchvision CIFAR-10 ({err})"
        ) from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def split_indices(
    labels: torch.Tensor, val_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices holding out ``val_size`` items, balanced over classes.

    Each class gives ``val_size // num_classes`` items (the first classes one more each for the
    remainder), chosen by a permutation seeded with ``seed``: the same seed always holds out the
    same images.
    """
    n = labels.numel()
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    classes = labels.unique()
    per_class, extra = divmod(val_size, classes.numel())
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    picked = []
    for i, c in enumerate(classes):
        take = per_class + (1 if i < extra else 0)
        members = order[labels[order] == c]
        if take > members.numel():
            raise ValueError(
                f"val_size={val_size} asks {take} items of class {int(c)}, "
                f"which has {members.numel()}"
            )
        picked.append(members[:take])
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[torch.cat(picked)] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def load_cifar10(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    download: bool = False,
    val_size: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images as (N, 3, 32, 32) uint8 and labels as (N,) int64, in ``CLASSES`` order.

    Args:
        root: a folder or archive in any layout of the module docstring; ``None`` reads
            ``$SELACT_DATA``, then a torchvision copy in the cache folder.
        split: "train", "val" or "test". With ``val_size > 0``, "train" leaves out the
            ``val_size`` training images that "val" returns; "val" needs ``val_size > 0``.
        download: let torchvision download into the cache folder when no data was given.
        val_size: training images held out for validation (the project uses 5000).
        seed: chooses the held-out images; fixed per experiment so the split never moves.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "val" and val_size <= 0:
        raise ValueError("split='val' needs val_size > 0 (the project uses 5000)")
    base_split = "test" if split == "test" else "train"
    located = data_root(root)
    if located is not None:
        source = _find_source(located)
        if source.kind == "torchvision":
            images, labels = _load_torchvision(source.path, base_split, download=False)
        else:
            images, labels = _load_jpeg(source, base_split)
    else:
        cache = cache_dir()
        if not (download or (cache / TORCHVISION_FOLDER).is_dir()):
            raise FileNotFoundError(
                f"{cache / TORCHVISION_FOLDER}: CIFAR-10 not found; give a data path (--data, a "
                f"folder holding {ARCHIVE_NAME}, its unpacked train/ test/ tree or "
                f"{TORCHVISION_FOLDER}/), set $SELACT_DATA, or allow a download (--download)"
            )
        images, labels = _load_torchvision(cache, base_split, download=download)
    if split == "test" or val_size == 0:
        return images, labels
    train_idx, val_idx = split_indices(labels, val_size, seed)
    keep = val_idx if split == "val" else train_idx
    return images[keep], labels[keep]


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD
) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return images.float().sub_(m).div_(s)


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, and random horizontal flip, per image.

    Works on a whole (N, C, H, W) batch with one gather, in the images' dtype.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = dy + torch.arange(h)
    cols = dx + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)  # a flip is a crop read right to left
    return padded[
        torch.arange(n).view(n, 1, 1, 1),
        torch.arange(c).view(1, c, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]


class BatchLoader:
    """Batches of normalised float32 images and labels from uint8 tensors held in memory.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        batch_size: images per batch.
        shuffle: a new seeded order each pass.
        augment: apply ``random_crop_flip`` before normalising.
        drop_last: skip a last batch smaller than ``batch_size``.
        seed: seeds the order and the augmentation, so runs repeat exactly.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be (N, C, H, W) uint8, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.labels.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.numel()
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            idx = order[sl] if order is not None else sl
            images = self.images[idx]
            if self.augment:
                images = random_crop_flip(images, self.generator)
            yield normalize(images), self.labels[idx]
