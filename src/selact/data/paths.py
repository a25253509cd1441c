"""Where data sets live on disk, and how files there are written safely.

A data set is found from, in order: an explicit path (``--data``), the ``SELACT_DATA``
environment variable, then a download into the cache folder (``SELACT_CACHE``, default
``~/.cache/selact``). Archives are unpacked once into the cache, and every file the package
writes goes to a temporary name first and is then renamed, so an interrupted run never leaves a
half-written archive tree, tensor cache or result behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

__all__ = [
    "DATA_ENV",
    "CACHE_ENV",
    "cache_dir",
    "data_root",
    "file_digest",
    "unpack_archive",
]

log = logging.getLogger(__name__)

DATA_ENV = "SELACT_DATA"
CACHE_ENV = "SELACT_CACHE"


def cache_dir() -> Path:
    """The folder for unpacked archives, decoded tensors and downloads (created on demand)."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "selact"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The data location given by ``path``, else by ``SELACT_DATA``, else ``None``.

    ``None`` means "nothing was given": the caller decides whether to download. A location that
    was given but does not exist is an error, so a typo never silently falls back to a download.
    """
    if path is not None and str(path) != "":
        source, root = "the data path", Path(path).expanduser()
    elif os.environ.get(DATA_ENV):
        source, root = f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser()
    else:
        return None
    if not root.exists():
        raise FileNotFoundError(f"{root}: {source} does not exist")
    return root


def file_digest(path: Path, length: int = 16) -> str:
    """The first ``length`` hex digits of a file's SHA-256: a cache key that survives moves."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def unpack_archive(archive: Path, dest: Path | None = None) -> Path:
    """Unpack a tar archive once and return the folder holding its contents.

    The default destination is ``cache_dir() / "<archive name>-<content digest>"``, so a changed
    archive gets a fresh folder. Members are checked with tarfile's ``data`` filter (no absolute
    paths, links out of the tree or device files); the archive is unpacked into a temporary
    sibling folder and renamed into place, so a crash never leaves a partial tree that looks done.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    if dest is None:
        stem = archive.name.split(".")[0]
        dest = cache_dir() / f"{stem}-{file_digest(archive)}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the unpacked tree is an ordinary cache folder
    try:
        log.info("unpacking %s into %s", archive, dest)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{archive}: cannot unpack archive ({err})") from err
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent unpack that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
