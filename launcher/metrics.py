"""Run metrics: metrics.jsonl rows, TensorBoard scalars, a progress line, summary.json.

Only rank 0 writes and prints unless ``log_all_ranks`` (then rank r also writes
``metrics-rank{r}.jsonl`` and prints with a ``[rank r]`` prefix); TensorBoard is rank 0's
alone. A resumed run drops the rows after its checkpoint, so metrics.jsonl never holds a
step twice and reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRAIN_KEYS = ("loss", "lr", "tokens_per_s")
"""Keys every training row carries (the run-directory contract)."""


class EtaEstimator:
    """Time left, from an exponential moving average of the seconds per optimizer step.

    The first ``skip`` samples are ignored: they include start-up costs (allocation,
    compilation, data warm-up) that would inflate the estimate for a long time.
    """

    def __init__(self, skip: int = 1, smoothing: float = 0.1) -> None:
        self.skip = skip
        self.smoothing = smoothing
        self.seconds_per_step: float | None = None
        self._seen = 0

    def update(self, step_time_s: float) -> None:
        self._seen += 1
        if self._seen <= self.skip:
            return
        if self.seconds_per_step is None:
            self.seconds_per_step = step_time_s
        else:
            self.seconds_per_step += self.smoothing * (step_time_s - self.seconds_per_step)

    def eta_s(self, steps_left: int) -> float | None:
        if self.seconds_per_step is None:
            return None
        return self.seconds_per_step * max(0, steps_left)


def format_eta(seconds: float | None) -> str:
    """HH:MM:SS (hours may exceed 99), or --:--:-- while there is no estimate."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """Writes one JSON row per logged step, TensorBoard scalars and a progress line.

    Args:
        run_dir: the run directory (created if missing).
        rank: this process's global rank.
        tensorboard: write TensorBoard event files (rank 0 only).
        total_steps: training.steps, for the progress percentage and the ETA.
        resume_step: the step of the checkpoint this run resumed from, or None for a
            fresh run (which starts metrics.jsonl empty).
        log_all_ranks: every rank writes its own metrics file and prints.
    """

    def __init__(self, run_dir: str | Path, rank: int, tensorboard: bool, total_steps: int,
                 resume_step: int | None = None, log_all_ranks: bool = False) -> None:
        self.rank = rank
        self.total_steps = total_steps
        self.active = rank == 0 or log_all_ranks
        self.eta = EtaEstimator()
        self._file = None
        self._writer = None
        if not self.active:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ("metrics.jsonl" if rank == 0 else f"metrics-rank{rank}.jsonl")
        if resume_step is None:
            self._file = self.path.open("w")
        else:
            truncate_after(self.path, resume_step)
            self._file = self.path.open("a")
        if tensorboard and rank == 0:
            # Imported here so that runs without TensorBoard do not need it installed.
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events a crashed run wrote after its last checkpoint.
            purge_step = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def log_train(self, step: int, metrics: Mapping[str, Any], step_time_s: float) -> None:
        """Log a training row; ``step_time_s`` is seconds per optimizer step, eval excluded."""
        missing = [k for k in TRAIN_KEYS if k not in metrics]
        if missing:
            raise ValueError(f"training metrics at step {step} lack {missing}")
        if not self.active:
            return
        self.eta.update(step_time_s)
        row = self._write(step, metrics, "train")
        eta = format_eta(self.eta.eta_s(self.total_steps - step))
        self._print(
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%) "
            f"loss {row['loss']:.4f} lr {row['lr']:.3e} tok/s {row['tokens_per_s']:,.0f} "
            f"eta {eta}")

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log an evaluation row (eval_loss, eval_ppl, ...)."""
        if not self.active:
            return
        row = self._write(step, metrics, "eval")
        values = " ".join(f"{k} {_short(row[k])}" for k in metrics)
        self._print(f"eval step {step}/{self.total_steps}: {values}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, step: int, metrics: Mapping[str, Any], kind: str) -> dict[str, Any]:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": time.time()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key not in ("step", "time") and _is_number(value):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
            self._writer.flush()
        return row

    def _print(self, line: str) -> None:
        prefix = f"[rank {self.rank}] " if self.rank != 0 else ""
        print(prefix + line, flush=True)


def truncate_after(path: Path, step: int) -> None:
    """Keep the rows of a metrics file with step <= ``step`` (and drop torn lines).

    Rows are appended in step order, so the rows kept are a prefix of the file, and the
    file is cut in place: that needs no free disk space, which matters because the run
    being resumed may have stopped on a full disk (a rewrite through a temporary copy
    then failed with ENOSPC before training could even start). Only a file whose kept
    rows are not a prefix (a torn line in the middle) is rewritten through a copy.
    """
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    keep = [_row_step(line) <= step for line in lines]
    cut = keep.index(False) if False in keep else len(lines)
    if any(keep[cut:]):
        kept = (line if line.endswith(b"\n") else line + b"\n"
                for line, k in zip(lines, keep, strict=True) if k)
        atomic_write_text(path, b"".join(kept).decode())
        return
    if cut < len(lines):
        os.truncate(path, sum(len(line) for line in lines[:cut]))
    if cut and not lines[cut - 1].endswith(b"\n"):
        with path.open("ab") as f:
            f.write(b"\n")


def _row_step(line: bytes) -> float:
    """The step of a metrics row; infinity for a torn or foreign line (always dropped)."""
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return math.inf
    value = row.get("step") if isinstance(row, dict) else None
    return value if isinstance(value, (int, float)) else math.inf


def write_summary(run_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write summary.json atomically (readers see the old file or the new, never half).

    Call it on rank 0 only.
    """
    path = Path(run_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=2, default=_json_default) + "\n")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers, so that json can write them."""
    return value.item() if hasattr(value, "item") else value


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"summary value {value!r} of type {type(value).__name__} is not JSON")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
