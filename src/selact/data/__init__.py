"""Data sets as tensors: locating them on disk, caching decoded images, batching on tensors."""

from selact.data.cifar10 import (
    CLASSES,
    MEAN,
    STD,
    BatchLoader,
    load_cifar10,
    normalize,
    random_crop_flip,
    split_indices,
)
from selact.data.paths import cache_dir, data_root

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "BatchLoader",
    "load_cifar10",
    "normalize",
    "random_crop_flip",
    "split_indices",
    "cache_dir",
    "data_root",
]
