"""The project's experiments, built only on selact's public API."""

from selact.experiments.demo import DemoConfig, DemoResult, DemoRow, run_demo

__all__ = ["DemoConfig", "DemoResult", "DemoRow", "run_demo"]
