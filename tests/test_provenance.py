"""The commit recorded in result rows."""

import re

from selact._provenance import commit


def test_commit_prefers_selact_commit_then_git(monkeypatch):
    commit.cache_clear()
    monkeypatch.setenv("SELACT_COMMIT", "abc123+copy")
    assert commit() == "abc123+copy"
    commit.cache_clear()
    monkeypatch.delenv("SELACT_COMMIT")
    assert commit() == "unknown" or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", commit())
    commit.cache_clear()
