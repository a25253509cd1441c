"""SearchStore: each budget search runs once across a sweep's processes, is stored only when
complete, and is used only by a sweep of the same identity."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from selact.amu.budget import BudgetResult
from selact.experiments.search_store import SearchStore

KEY = ("sapi", "element", "global")
IDENTITY = {"dense_sha256": "abc", "targets": (0.5, 0.25)}


def _results(reached: bool = True) -> list[BudgetResult]:
    last = 0.25 if reached else 0.3
    return [
        BudgetResult(0.5, {"conv1": 0.6, "fc": 0.4}, 0.49, 0.01, "global", 7),
        BudgetResult(0.25, {"conv1": 0.3, "fc": 0.2}, last, 0.2, "global", 9),
    ]


def _complete(found):
    return all(r.executed_fraction <= r.target + 1e-6 for r in found)


class _Counted:
    def __init__(self, results, delay=0.0):
        self.results, self.delay, self.calls = results, delay, 0

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        return self.results


def test_a_complete_search_runs_once_and_reads_back_equal(tmp_path):
    run = _Counted(_results())
    first = SearchStore(tmp_path, IDENTITY).get(KEY, run, _complete)
    again = SearchStore(tmp_path, IDENTITY).get(KEY, run, _complete)
    assert run.calls == 1
    assert again == first == _results()
    assert not list(tmp_path.glob("*.lock"))


def test_another_identity_or_an_incomplete_search_is_run_again(tmp_path):
    run = _Counted(_results())
    SearchStore(tmp_path, IDENTITY).get(KEY, run, _complete)
    SearchStore(tmp_path, {**IDENTITY, "dense_sha256": "other"}).get(KEY, run, _complete)
    assert run.calls == 2
    partial = _Counted(_results(reached=False))
    store = SearchStore(tmp_path / "partial", IDENTITY)
    assert store.get(KEY, partial, _complete) == _results(reached=False)
    store.get(KEY, partial, _complete)
    assert partial.calls == 2  # a search its deadline cut short is not reused by a later look
    assert store.load(KEY) is None
    assert store.load(KEY, incomplete=True) == _results(reached=False)


def test_a_waiter_reads_what_the_lock_holder_wrote(tmp_path):
    slow, waiter = _Counted(_results(), delay=0.5), _Counted([])
    got = {}
    holder = threading.Thread(
        target=lambda: got.setdefault(
            "holder", SearchStore(tmp_path, IDENTITY).get(KEY, slow, _complete)
        )
    )
    holder.start()
    while not list(tmp_path.glob("*.lock")):
        time.sleep(0.01)
    got["waiter"] = SearchStore(tmp_path, IDENTITY, poll=0.05).get(KEY, waiter, _complete)
    holder.join()
    assert (slow.calls, waiter.calls) == (1, 0)
    assert got["waiter"] == got["holder"] == _results()


def test_a_waiter_takes_an_incomplete_search_it_waited_for(tmp_path):
    slow, waiter = _Counted(_results(reached=False), delay=0.5), _Counted([])
    holder = threading.Thread(
        target=lambda: SearchStore(tmp_path, IDENTITY).get(KEY, slow, _complete)
    )
    holder.start()
    while not list(tmp_path.glob("*.lock")):
        time.sleep(0.01)
    got = SearchStore(tmp_path, IDENTITY, poll=0.05).get(KEY, waiter, _complete)
    holder.join()
    assert (slow.calls, waiter.calls) == (1, 0)
    assert got == _results(reached=False)


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "sapi-element-global.lock").write_text(dead.stdout.strip())
    run = _Counted(_results())
    assert SearchStore(tmp_path, IDENTITY, poll=0.01).get(KEY, run, _complete) == _results()
    assert run.calls == 1


def test_a_live_owner_past_the_deadline_means_running_it_here(tmp_path):
    (tmp_path / "sapi-element-global.lock").write_text("1")  # PID 1 never dies
    run = _Counted(_results())
    store = SearchStore(tmp_path, IDENTITY, poll=0.01)
    assert store.get(KEY, run, _complete, deadline=time.monotonic() + 0.05) == _results()
    assert run.calls == 1
    assert (tmp_path / "sapi-element-global.lock").exists()  # not ours to remove


def test_a_corrupt_file_is_searched_again_and_clear_empties(tmp_path, caplog):
    (tmp_path / "sapi-element-global.json").write_text("{not json")
    run = _Counted(_results())
    store = SearchStore(tmp_path, IDENTITY)
    assert store.get(KEY, run, _complete) == _results()
    assert run.calls == 1 and "unreadable stored search" in caplog.text
    store.clear()
    assert store.load(KEY) is None
