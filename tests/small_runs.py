"""Small trainer runs in tests: the shared overrides, and reading a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path


def small_run(corpus: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    """``--set`` overrides for the tiny model on the test corpus: 8 x 32 tokens per step
    in micro-batches of 4, rank 8, no TensorBoard. ``extra`` adds or overrides keys (the
    last value of a key wins)."""
    return [f"data.path={corpus}", f"data.tokenizer={tokenizer}", f"run.dir={run_dir}",
            "model.max_seq_len=32", "training.seq_len=32", "training.batch_size=8",
            "training.micro_batch_size=4", "optim.rank=8", "run.tensorboard=false", *extra]


#: Fields that differ between two runs of the same computation.
TIMING_FIELDS = {"time", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
                 "peak_memory_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes"}


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl, train and eval, minus the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row."""
    return [(r["step"], r["loss"]) for r in metric_rows(run_dir) if "loss" in r]
