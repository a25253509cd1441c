"""Shared fixtures: every test starts from the same torch random state; ``gpu`` tests need CUDA;
without CUDA, Triton kernels run in Triton's interpreter."""

import faulthandler
import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on the CPU; it must be set before they compile.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# In CI (the CI environment variable set, as .ci/run does) Hypothesis draws the same examples on
# every run, seeded from each test, so that a failure there is reproduced by the same test here.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """A crash (a segfault) prints the crashing thread's stack alone, to the terminal: a log that
    keeps only its tail still shows it (pytest's own handler lists every thread, idle ones first)."""
    faulthandler.enable(file=os.dup(2), all_threads=False)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _wide_cli_output(monkeypatch):
    """Rich wraps the CLI's error panels at the terminal's width (80 columns under CliRunner): a
    long temporary path would break across lines and a test looking for a file's name would miss
    it. A wide terminal keeps each message on one line."""
    monkeypatch.setenv("COLUMNS", "1000")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
