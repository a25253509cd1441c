"""The commit that result rows record (benchmarks, sweeps)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@functools.cache
def commit() -> str:
    """``$SELACT_COMMIT`` if set (a copy of the code sent to another machine may carry a stale git
    history), else ``git rev-parse --short=12 HEAD`` of this package's checkout, with ``+dirty``
    when its sources differ from that commit; ``unknown`` outside git."""
    if os.environ.get("SELACT_COMMIT"):
        return os.environ["SELACT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=_PACKAGE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=_PACKAGE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changed else "")
