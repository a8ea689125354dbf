"""Benchmark-only code, outside the product's import path: published architectures with random weights
(`synthetic`) and analytic FLOP counts (`flops`) for `scripts/bench*.py` and their tests."""
