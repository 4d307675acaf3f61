"""Reading a run directory's metrics in tests: rows without the timing-dependent fields."""

from __future__ import annotations

import json
from pathlib import Path

#: Fields that differ between two runs of the same computation.
TIMING_FIELDS = {"time", "tokens_per_s", "peak_memory_gb"}


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl, train and eval, minus the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row."""
    return [(r["step"], r["loss"]) for r in metric_rows(run_dir) if "loss" in r]
