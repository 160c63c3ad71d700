"""Iris benchmarks: ``python -m benchmarks [--smoke] [--only NAME ...]``.

See ``docs/performance.md`` for the figures, their targets and how to read them.
"""
