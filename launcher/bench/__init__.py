"""Benchmarks: each prints a table and one JSON line, ratios against a baseline in the same run."""

from __future__ import annotations

import importlib


def run_benchmark(name: str, argv: list[str]) -> None:
    """Import ``launcher.bench.<name>`` and run its ``main(argv)``."""
    importlib.import_module(f"launcher.bench.{name}").main(argv)
