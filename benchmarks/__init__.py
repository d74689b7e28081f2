"""Benchmark scripts; a package so that `from benchmarks.common import ...` finds common.py."""
