"""Benchmarks: real pretrained models vs the tools users pick today, side by side in one run."""
