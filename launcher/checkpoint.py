"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, pruned, checked on load.

Layout: ``<run.dir>/ckpt/step-N/`` holds DCP's files (one ``.distcp`` per rank plus
``.metadata``) and our ``COMPLETE.json`` marker. A save writes ``step-N.tmp/`` on every
rank; only when all ranks are done does rank 0 add the marker and rename the directory
to ``step-N``. A crash at any point leaves at most a ``.tmp`` directory, which
``find_latest`` ignores and the next save removes, so the previous checkpoint stays the
latest usable one. All ranks must see one shared filesystem.

``state`` is one dict with flat keys (``model``, ``optimizer``, ``lr_scheduler``,
``dataloader``, ``train_state``, ``rng``), each a state_dict or a ``Stateful``. DCP
stores non-tensor values (ints, strings, lists, nested dicts) as pickled bytes and loads
everything in place into the structure it is given, so a loading run must present the
same keys; ``load`` checks that both ways, because DCP alone silently skips checkpoint
entries the target lacks (e.g. the moments of an optimizer that has not stepped yet).

A value that implements ``NativeCheckpoint`` (DeepSpeed's engine) bypasses DCP: it writes
and reads its own files in ``step-N/<key>/``, inside the same atomic publish and pruning.

Plain tensors that are not DTensors are treated as replicated: DCP writes rank 0's copy.
This is right for everything here (all ranks hold identical copies), RNG state included.
It works in one process without a process group (DCP then runs without collectives).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.stateful import Stateful

from launcher.train_state import ModelState

MARKER = "COMPLETE.json"
"""Written last, by rank 0: a step directory without it is not a checkpoint."""

_STEP_DIR = re.compile(r"step-(\d+)")
_SCRATCH_SUFFIXES = (".tmp", ".old")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says what to do."""


@runtime_checkable
class NativeCheckpoint(Protocol):
    """A state value that saves itself in its own format, in ``step-N/<its key>/``.

    For state DCP cannot describe as one tensor per name (DeepSpeed's per-rank partitions).
    Both methods are collective: ``save`` and ``load`` call them on every rank.
    """

    def save_native(self, path: Path) -> None: ...

    def load_native(self, path: Path) -> None: ...


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step}"


def save(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep_latest: int = 0) -> Path:
    """Save ``state`` as ``ckpt_dir/step-{step}`` on every rank; return that path.

    ``keep_latest`` > 0 then deletes all but that many newest complete checkpoints,
    never the one just written. Collective: every rank must call it. A failed save raises
    CheckpointError and leaves the earlier checkpoints as they were.
    """
    ckpt_dir = Path(ckpt_dir)
    final = step_dir(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    is_rank0 = _rank() == 0
    if is_rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_scratch(ckpt_dir)
    _barrier()  # no rank writes into a directory rank 0 is still removing
    native, state = _split_native(state)
    try:
        with _single_process_quiet():
            dcp.save(state, storage_writer=FileSystemWriter(tmp, sync_files=True))
    except CheckpointException as e:  # a BaseException: turn it into one callers can catch
        raise CheckpointError(f"saving checkpoint {final} failed: {_first_line(e)}") from e
    for key, value in native.items():
        value.save_native(tmp / key)
    _barrier()  # every shard is on disk before the checkpoint is published
    if is_rank0:
        marker = {"step": step, "world_size": _world_size(), "time": time.time()}
        _write_synced(tmp / MARKER, json.dumps(marker) + "\n")
        _fsync_dir(tmp)
        _publish(tmp, final)
        if keep_latest > 0:
            _prune(ckpt_dir, keep_latest, keep=final)
    _barrier()  # no rank moves on (or looks for the latest) before it is published
    return final


def load(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``state`` in place; return its marker.

    Stateful values get ``load_state_dict``; plain dict values are replaced by the
    loaded dicts. Raises CheckpointError for a missing, incomplete or corrupt
    checkpoint, or one whose keys differ from ``state``'s.
    """
    path = Path(path)
    marker = _read_marker(path)
    _check_files(path)
    native, state = _split_native(state)
    for key in native:
        if not (path / key).is_dir():
            raise CheckpointError(
                f"checkpoint {path} has no {key}/ folder: it was written by another "
                "parallel.engine. Set checkpoint.resume=never to start afresh.")
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=FileSystemReader(path), planner=_StrictLoadPlanner(path))
        for key, value in native.items():
            value.load_native(path / key)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        raise _own_error(e) or _corrupt(path, f"reading it failed: {_first_line(e)}") from e
    return marker


def stored_model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shape of every model weight in the checkpoint at ``path``, keyed by parameter name.

    Raises CheckpointError for a missing, incomplete or unreadable checkpoint, and for a
    DeepSpeed one, whose weights are in DeepSpeed's own files rather than in DCP's.
    """
    path = Path(path)
    _read_marker(path)
    _check_files(path)
    try:
        stored = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # whatever the reader raises, the checkpoint is unusable
        raise _corrupt(path, f"reading its metadata failed: {_first_line(e)}") from e
    shapes = {k.removeprefix("model."): tuple(v.size) for k, v in stored.items()
              if k.startswith("model.") and hasattr(v, "size")}
    if not shapes:
        raise CheckpointError(f"checkpoint {path} holds no DCP model weights (a "
                              "parallel.engine=deepspeed checkpoint keeps them in its own "
                              "format); export is available for ddp and fsdp checkpoints")
    return shapes


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the ``model`` entry of the checkpoint at ``path`` into ``model`` (one
    process, e.g. for export), ignoring optimizer, data and RNG state.

    Every weight of ``model`` must be in the checkpoint with its shape: a partial load
    that silently left initial weights in place would export an untrained model.
    """
    path = Path(path)
    stored = stored_model_shapes(path)
    target = ModelState(model)
    wrong = [f"model.{k}" for k, v in target.state_dict().items()
             if stored.get(k) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not hold this model's weights "
                              f"(missing or another shape: {_some(set(wrong))}); was it "
                              "written with another model.size or vocabulary?")
    try:
        with _single_process_quiet():
            dcp.load({"model": target}, storage_reader=FileSystemReader(path),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as e:
        raise _own_error(e) or _corrupt(path, f"reading it failed: {_first_line(e)}") from e


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = _complete_checkpoints(Path(ckpt_dir))
    return complete[-1][1] if complete else None


def resolve_resume(ckpt_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint that ``checkpoint.resume`` asks for: auto, never, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint directory "
            f"(no {MARKER}); use auto, never or a ckpt/step-N path")
    return path


class RNGState(Stateful):
    """Python, torch CPU and (if present) CUDA generator states, as tensors.

    Put an instance under ``state["rng"]``: saving captures the generators, loading
    restores them. Python's Mersenne Twister state (version, 624 words, position) fits
    int64; the cached Gaussian of ``random.gauss`` is kept as (present, value).
    """

    def state_dict(self) -> dict[str, torch.Tensor]:
        version, words, gauss_next = random.getstate()
        state = {
            "python": torch.tensor([version, *words], dtype=torch.int64),
            "python_gauss": torch.tensor(
                [gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        version, *words = state_dict["python"].tolist()
        has_gauss, gauss = state_dict["python_gauss"].tolist()
        random.setstate((version, tuple(words), gauss if has_gauss else None))
        torch.set_rng_state(state_dict["torch"].cpu())
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"].cpu())


# ------------------------------------------------------------------ load checks


class _StrictLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, plus an error when the checkpoint's keys differ from the target's."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        expected, stored = set(self.state_dict), set(metadata.state_dict_metadata)
        if expected != stored:
            raise CheckpointError(
                f"checkpoint {self.path} does not match this run's state: "
                f"only in this run: {_some(expected - stored)}; "
                f"only in the checkpoint: {_some(stored - expected)}. A different model, "
                "optimizer or config? (An optimizer must have stepped once, or have had its "
                "state initialized, before loading.) Set checkpoint.resume=never to start "
                "afresh.")


def _split_native(state: dict[str, Any]) -> tuple[dict[str, NativeCheckpoint], dict[str, Any]]:
    native = {k: v for k, v in state.items() if isinstance(v, NativeCheckpoint)}
    return native, {k: v for k, v in state.items() if k not in native}


def _read_marker(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    try:
        return json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise _corrupt(path, f"it has no {MARKER}, so its save never finished") from None
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"its {MARKER} is unreadable: {e}") from e


def _check_files(path: Path) -> None:
    """Every byte range DCP's metadata points at exists: catches missing/truncated files."""
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:
        raise _corrupt(path, f"its .metadata is missing or unreadable: {_first_line(e)}") from e
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        file = path / info.relative_path
        if info.relative_path not in sizes:
            sizes[info.relative_path] = file.stat().st_size if file.is_file() else -1
        if sizes[info.relative_path] < 0:
            raise _corrupt(path, f"{info.relative_path} is missing")
        if sizes[info.relative_path] < info.offset + info.length:
            raise _corrupt(path, f"{info.relative_path} is truncated")


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is unusable: {why}. Delete it to resume from an older one, "
        "or set checkpoint.resume=never (or to another checkpoint's path).")


def _own_error(e: BaseException) -> CheckpointError | None:
    """Our mismatch error, which DCP wraps in a CheckpointException per failing rank."""
    if isinstance(e, CheckpointException):
        for failure, _trace in e.failures.values():
            if isinstance(failure, CheckpointError):
                return failure
    return None


def _first_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()))[0]
    lines = str(e).strip().splitlines()
    first_sentence = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(e).__name__}: {first_sentence}"


def _some(keys: set[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = sorted(keys)[:limit]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


# ------------------------------------------------------------------ directory handling


def _complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is replaced whole, never mixed.

    Re-saving a step (after resuming from an older checkpoint) moves the old directory
    aside first: between the two renames neither is the latest, for a moment only.
    """
    if final.exists():
        old = final.with_name(final.name + ".old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(ckpt_dir: Path, keep_latest: int, keep: Path) -> None:
    complete = _complete_checkpoints(ckpt_dir)
    for _step, path in complete[:-keep_latest]:
        if path != keep:
            shutil.rmtree(path)


def _remove_scratch(ckpt_dir: Path) -> None:
    """Delete the .tmp/.old directories that crashed saves left behind."""
    for child in ckpt_dir.iterdir():
        stem, dot, suffix = child.name.rpartition(".")
        if dot and "." + suffix in _SCRATCH_SUFFIXES and _STEP_DIR.fullmatch(stem):
            shutil.rmtree(child)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds the entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ process group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
