"""Benchmarks: ``python -m benchmarks`` (see README for the figures)."""
