"""``python -m selact``: the same command as ``selact``."""

from selact.cli import app

app()
