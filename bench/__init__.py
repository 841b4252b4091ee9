"""Benchmarks: each ``*_bench.py`` measures a ratio against the obvious alternative in one run."""
