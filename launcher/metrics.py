"""Run metrics: metrics.jsonl rows, TensorBoard scalars, a progress line, summary.json.

Only rank 0 writes and prints unless ``log_all_ranks`` (then rank r also writes
``metrics-rank{r}.jsonl`` and prints with a ``[rank r]`` prefix); TensorBoard and
Weights & Biases are rank 0's alone. Both receive every numeric value of a row as
``train/<key>`` or ``eval/<key>``, and the config (TensorBoard: HParams and the text of
config.yaml), so runs can be sorted and filtered by setting. A resumed run drops the
rows after its checkpoint, so metrics.jsonl never holds a step twice and reads as one
uninterrupted run.
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

import yaml

from launcher.config import ConfigError

TRAIN_KEYS = ("loss", "lr", "tokens_per_s")
"""Keys every training row carries (the run-directory contract)."""

HPARAM_METRICS = ("eval/eval_loss", "eval/eval_ppl", "train/loss",
                  "train/tokens_per_s_per_device", "train/mfu")
"""Scalars the TensorBoard HParams table shows beside each run's settings."""


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
        config: the run's config as ``config_to_dict`` gives it, for TensorBoard's
            HParams and text.
        wandb_run: a ``wandb.init`` run (``start_wandb``) that receives the rows too;
            its owner finishes it, so that it outlives a rollback's new logger.
    """

    def __init__(self, run_dir: str | Path, rank: int, tensorboard: bool, total_steps: int,
                 resume_step: int | None = None, log_all_ranks: bool = False,
                 config: Mapping[str, Any] | None = None, wandb_run: Any = None) -> None:
        self.rank = rank
        self.total_steps = total_steps
        self.active = rank == 0 or log_all_ranks
        self.eta = EtaEstimator()
        self._file = None
        self._writer = None
        self._wandb = wandb_run if rank == 0 else None
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
            if config is not None:
                write_tensorboard_config(self._writer, config)

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
        scalars = {f"{kind}/{key}": value for key, value in row.items()
                   if key not in ("step", "time") and _is_number(value)}
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return row

    def _print(self, line: str) -> None:
        prefix = f"[rank {self.rank}] " if self.rank != 0 else ""
        print(prefix + line, flush=True)


def write_tensorboard_config(writer: Any, config: Mapping[str, Any]) -> None:
    """The config as HParams (one per ``section.key``) and as config.yaml's text.

    The HParams summaries go into the run's own event file, not into the sub-run that
    ``SummaryWriter.add_hparams`` would create, so the HParams table lists each run
    directory once, with the scalars ``HPARAM_METRICS`` names read from that run.
    """
    from torch.utils.tensorboard.summary import hparams

    flat = {f"{section}.{key}": _hparam_value(value)
            for section, values in config.items() if section != "methods"
            for key, value in values.items()}
    for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.file_writer.add_summary(summary)
    # Four spaces make Markdown show the YAML as a code block.
    text = yaml.safe_dump(dict(config))
    writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))


def start_wandb(project: str, run_dir: str | Path, config: Mapping[str, Any]) -> Any:
    """Start rank 0's W&B run, named after the run directory, with the config (minus the
    ``methods`` echo of the preset) as its settings; W&B's files go under run_dir/wandb.
    WANDB_ENTITY, WANDB_MODE (offline) and WANDB_RUN_ID with WANDB_RESUME=allow (to
    continue one W&B run across relaunches) are read by wandb itself."""
    wandb = import_wandb()
    settings = {section: values for section, values in config.items() if section != "methods"}
    return wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir),
                      config=settings)


def import_wandb() -> Any:
    """wandb, imported only when run.wandb_project is set (it is an optional extra)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("run.wandb_project is set but wandb is not installed: pip install "
                          "-c constraints.txt -e '.[wandb]' (or pip install wandb), or unset "
                          "run.wandb_project") from None
    return wandb


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


def _hparam_value(value: Any) -> Any:
    """HParams take numbers, strings and booleans (None is left out); lists become text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
