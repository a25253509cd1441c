"""Budget searches shared by the processes of one sweep (``--workers N``): the first process
that needs a search runs it and writes it to a folder; the others wait for the file and read it.

Without it every shard ran the same searches (on the H100 ResNet-20, four shards each spent about
60 s on SAPI's global search). A stored search carries an ``identity`` (the dense checkpoint's
hash, the targets, the search settings) and is used only where it matches, so an old file never
stands in for a search of another model or recipe. A search that its deadline stopped before every
target is stored as incomplete: the processes that waited for it take it (they have no more time
than its owner had), a later look at the folder runs it again.

Locking is a file created with ``O_EXCL`` holding its owner's PID: a waiter that finds the owner
dead (killed by a timeout) removes the lock and runs the search itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selact._files import atomic_write_text
from selact.amu.budget import BudgetResult

log = logging.getLogger(__name__)


class SearchStore:
    """Complete budget searches on disk, one JSON file per (strategy, granularity, allocation).

    Args:
        folder: where the files and locks live (shared by the sweep's processes).
        identity: what a stored search must match to be used (JSON-serialisable).
        poll: seconds between looks while another process runs a search.
    """

    def __init__(self, folder: str | os.PathLike[str], identity: dict[str, Any], poll: float = 0.5):
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity))  # as it will read back
        self.poll = poll

    def _path(self, key: tuple[str, str, str]) -> Path:
        return self.folder / ("-".join(key) + ".json")

    def load(
        self, key: tuple[str, str, str], incomplete: bool = False
    ) -> list[BudgetResult] | None:
        """The stored search ``key`` if there is one of this identity (and complete, unless
        ``incomplete``), else None."""
        path = self._path(key)
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("%s: unreadable stored search (%s); searching again", path, error)
            return None
        if stored.get("identity") != self.identity or not (incomplete or stored.get("complete")):
            return None
        return [BudgetResult(**result) for result in stored["results"]]

    def get(
        self,
        key: tuple[str, str, str],
        run: Callable[[], list[BudgetResult]],
        complete: Callable[[list[BudgetResult]], bool],
        deadline: float | None = None,
    ) -> list[BudgetResult]:
        """The search ``key``: read from the folder, or run here (``run()``) and stored, marked
        ``complete(results)``. While another live process holds the key's lock, wait for it
        (until ``deadline``, :func:`time.monotonic`; then run it here) and take what it stored,
        complete or not."""
        path = self._path(key)
        lock = path.with_suffix(".lock")
        self.folder.mkdir(parents=True, exist_ok=True)
        waited = False
        while True:
            found = self.load(key, incomplete=waited)
            if found is not None:
                return found
            if _take(lock):
                break
            if deadline is not None and time.monotonic() >= deadline:
                log.warning(
                    "search %s: still running elsewhere at the deadline; running it here", key
                )
                return run()
            time.sleep(self.poll)
            waited = True
        try:
            found = self.load(key)  # written between our look and our lock
            if found is not None:
                return found
            path.unlink(missing_ok=True)  # an incomplete one: only ours may be read from now on
            results = run()
            payload = {
                "identity": self.identity,
                "complete": complete(results),
                "results": [r.to_dict() for r in results],
            }
            atomic_write_text(path, json.dumps(payload, indent=1))
            return results
        finally:
            lock.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every stored search (a run that starts over)."""
        for path in self.folder.glob("*.json"):
            path.unlink(missing_ok=True)


def _take(lock: Path) -> bool:
    """Create ``lock`` holding our PID; False while a live process holds it (a dead owner's lock
    is removed, and taken on the next try)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            owner = int(lock.read_text(encoding="utf-8") or "0")
        except (OSError, ValueError):
            return False  # being written: look again
        if owner and not _alive(owner):
            lock.unlink(missing_ok=True)
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(str(os.getpid()))
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
