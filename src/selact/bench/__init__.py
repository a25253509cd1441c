"""Benchmarks (not tests): kernels and models, dense against selective, as ratios measured in the
same run. ``selact bench kernels`` and ``selact bench model``."""
