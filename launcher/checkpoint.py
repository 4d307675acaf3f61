"""Checkpoints with torch.distributed.checkpoint (DCP): atomic, checksummed, safely loaded.

Layout: ``<run.dir>/ckpt/step-N/`` holds DCP's files (one ``.distcp`` per rank plus
``.metadata``) and our ``COMPLETE.json`` marker. A save writes ``step-N.tmp/`` on every
rank; only when all ranks are done does rank 0 add the marker and rename the directory
to ``step-N``. A crash at any point leaves at most a ``.tmp`` directory, which
``find_latest`` ignores and ``remove_scratch`` (or the next save) removes, so the
previous checkpoint stays the latest usable one. All ranks must see one shared
filesystem.

``state`` is one dict with flat keys (``model``, ``optimizer``, ``lr_scheduler``,
``dataloader``, ``train_state``, ``rng``), each a state_dict or a ``Stateful``. DCP
stores non-tensor values (ints, strings, lists, nested dicts) as pickled bytes and loads
everything in place into the structure it is given, so a loading run must present the
same keys; ``load`` checks that both ways, because DCP alone silently skips checkpoint
entries the target lacks (e.g. the moments of an optimizer that has not stepped yet).

Loading runs no code from the checkpoint: ``.metadata`` and the pickled values go
through ``launcher.safe_metadata``'s allowlists, and a file that names anything else is
refused (docs/checkpoints.md has the trust model).

The marker records every file's size and CRC32. After a save the ranks share the hashing
(file i of the sorted list by rank i % world size); a load verifies the same way and the
ranks agree on the verdict, so every rank raises the same CheckpointError naming the
damaged file. Checkpoints written before checksums load unchecked.

A save that fails for lack of disk space says so (what it needed, what is free), removes
its partial ``step-N.tmp`` and keeps the previous checkpoint. ``save_async`` stages the
state in memory and lets DCP write it from a background thread (on a gloo group of its
own), which also hashes this rank's share; ``PendingSave.publish`` then publishes it
exactly as ``save`` does.

A value that implements ``NativeCheckpoint`` (DeepSpeed's engine) bypasses DCP: it writes
and reads its own files in ``step-N/<key>/``, inside the same atomic publish, checksums
and pruning.

Plain tensors that are not DTensors are treated as replicated: DCP writes rank 0's copy.
This is right for everything here (all ranks hold identical copies), RNG state included.
It works in one process without a process group (DCP then runs without collectives).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
import warnings
import weakref
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.stateful import Stateful

from launcher.distributed import (
    all_gather_objects,
    barrier,
    from_rank0,
    is_grouped,
    new_cpu_group,
)
from launcher.safe_metadata import SafeFileSystemReader, SafeLoadPlanner, UnsafeContentError
from launcher.train_state import ModelState
from lotus_dist.data import DataError

MARKER = "COMPLETE.json"
"""Written last, by rank 0: a step directory without it is not a checkpoint."""

CHECKSUM = "crc32"
"""The per-file checksum in the marker: zlib's CRC32 (about 2 GB/s per core, and it
catches every single-bit flip); it detects damage, not tampering."""

_STEP_DIR = re.compile(r"step-(\d+)")
_SCRATCH_SUFFIXES = (".tmp", ".old")
_HASH_CHUNK = 8 << 20
_LOW_SPACE = 64 << 20
"""A failed write with less free space than this (or 5% of the disk) ran out of it."""


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


# ------------------------------------------------------------------ saving


def save(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep_latest: int = 0) -> Path:
    """Save ``state`` as ``ckpt_dir/step-{step}`` on every rank; return that path.

    ``keep_latest`` > 0 then deletes all but that many newest complete checkpoints,
    never the one just written. Collective: every rank must call it. A failed save raises
    the same CheckpointError on every rank, removes its partial files and leaves the
    earlier checkpoints as they were.
    """
    final, tmp = _begin_save(ckpt_dir, step)
    native, dcp_state = _split_native(state)
    tensor_bytes, failure, cause = 0, None, None
    try:
        plain = _state_dicts(dcp_state)
        tensor_bytes = _tensor_bytes(plain)
        with _single_process_quiet():
            dcp.save(plain, storage_writer=FileSystemWriter(tmp, sync_files=True))
        for key, value in native.items():
            value.save_native(tmp / key)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        failure, cause = _save_failure(e, final, tensor_bytes), e
    _raise_agreed(failure, tmp, cause)  # every shard is on disk, or every rank raises
    files = from_rank0(_list_files(tmp) if _rank() == 0 else None)
    try:
        share = _hash_share(tmp, files)
    except OSError as e:
        share, failure, cause = {}, _save_failure(e, final, tensor_bytes), e
    checksums = _merge_shares(share, failure, tmp, cause)
    _publish_on_rank0(tmp, final, checksums, keep_latest, tensor_bytes)
    return final


def save_async(ckpt_dir: str | Path, step: int, state: dict[str, Any],
               keep_latest: int = 0) -> PendingSave:
    """Start saving ``state`` as ``ckpt_dir/step-{step}`` and return at once.

    The state is copied to CPU memory before this returns (training may change it right
    away); DCP writes the copy from a background thread, and that thread then hashes this
    rank's share of the files. Call ``publish()`` on the result, on every rank at the same
    point, to add the marker and rename: until then the checkpoint does not exist.
    Collective. Only one save may be in flight: publish it before the next ``save`` or
    ``save_async``. A state with a ``NativeCheckpoint`` (DeepSpeed) is saved synchronously
    and comes back already published.
    """
    native, dcp_state = _split_native(state)
    if native:
        warnings.warn("checkpoint.async: DeepSpeed writes its own files, so this checkpoint "
                      "is saved synchronously", stacklevel=2)
        pending = PendingSave(save(ckpt_dir, step, state, keep_latest), keep_latest, 0, None)
        pending._outcome = pending.path
        return pending
    final, tmp = _begin_save(ckpt_dir, step)
    group = _async_group()
    try:
        plain = _state_dicts(dcp_state)
        if group is None:  # DCP warns from its thread, where catch_warnings cannot reach
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        upload = dcp.async_save(plain, storage_writer=FileSystemWriter(tmp, sync_files=True),
                                process_group=group, no_dist=group is None)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"staging checkpoint {final} for a background save failed: "
                              f"{_first_line(e)}") from e
    upload = getattr(upload, "upload_completion", upload)  # AsyncSaveResponse or Future
    job = _background().submit(_wait_and_hash, upload, tmp, _rank(), _world_size())
    pending = PendingSave(final, keep_latest, _tensor_bytes(plain), job)
    global _in_flight
    _in_flight = weakref.ref(pending)
    return pending


class PendingSave:
    """A checkpoint that ``save_async`` is writing in the background.

    ``done()`` is local and never blocks; ``publish()`` is collective. A trainer polls
    ``done()`` on every rank, agrees through its own per-step collective that all ranks
    are done (or decides to wait), and then calls ``publish()`` on every rank.
    """

    def __init__(self, path: Path, keep_latest: int, tensor_bytes: int,
                 job: Future | None) -> None:
        self.path = path
        """The checkpoint directory it becomes, ``ckpt_dir/step-N``."""
        self.step = int(_STEP_DIR.fullmatch(path.name).group(1))
        self.keep_latest = keep_latest
        self._tensor_bytes = tensor_bytes
        self._job = job
        self._outcome: Path | CheckpointError | None = None

    def done(self) -> bool:
        """This rank's background write (and its hashing) has finished, well or not."""
        return self._job is None or self._job.done()

    def publish(self) -> Path:
        """Wait for this rank's write, then publish the checkpoint as ``save`` does; return
        its path. Collective. Raises the same CheckpointError on every rank if any rank's
        write failed (the partial files are removed, earlier checkpoints kept). Calling it
        again returns the same path, or raises the same error."""
        if self._outcome is None:
            try:
                self._outcome = self._publish()
            except CheckpointError as e:
                self._outcome = e
        if isinstance(self._outcome, CheckpointError):
            raise self._outcome
        return self._outcome

    def _publish(self) -> Path:
        job, self._job = self._job, None
        tmp = self.path.with_name(self.path.name + ".tmp")
        failure, cause = None, None
        try:
            share = job.result()
        except (Exception, CheckpointException) as e:
            share, failure, cause = {}, _save_failure(e, self.path, self._tensor_bytes), e
        checksums = _merge_shares(share, failure, tmp, cause)
        _publish_on_rank0(tmp, self.path, checksums, self.keep_latest, self._tensor_bytes)
        return self.path


_in_flight: weakref.ref[PendingSave] | None = None
"""The last save_async's PendingSave, while it lives: a save must not start under it."""

_executor: ThreadPoolExecutor | None = None
_async_group_of: tuple[Any, Any] | None = None
"""(the default process group, the gloo group made from it for background saves)."""


def _begin_save(ckpt_dir: str | Path, step: int) -> tuple[Path, Path]:
    """Refuse to overlap an unpublished background save; rank 0 clears crashed saves'
    scratch. Returns (final, tmp)."""
    pending = _in_flight() if _in_flight is not None else None
    if pending is not None and pending._job is not None:
        raise CheckpointError(f"checkpoint step-{pending.step} from save_async is not "
                              "published yet: call its publish() before saving again")
    final = step_dir(ckpt_dir, step)
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_scratch(final.parent)
    barrier()  # no rank writes into a directory rank 0 is still removing
    return final, final.with_name(final.name + ".tmp")


def _state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    """Each Stateful's state_dict, taken here rather than inside DCP so that the save can
    count the bytes it writes (for a disk-full message)."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}


def _wait_and_hash(upload: Future, tmp: Path, rank: int, world: int) -> dict[str, Any]:
    """Background thread: wait for DCP's write, then hash this rank's share of its files.

    DCP's save returns the global metadata on every rank once every file is written, so
    every rank derives the same file list from it without touching the directory."""
    metadata: Metadata = upload.result()
    files = {info.relative_path for info in metadata.storage_data.values()} | {".metadata"}
    return _hash_files(tmp, _share(files, rank, world))


def _raise_agreed(failure: str | None, tmp: Path, cause: BaseException | None) -> None:
    """Collective: if any rank failed, every rank raises the first rank's failure."""
    failure = _first(all_gather_objects(failure))
    if failure:
        _abort(tmp, failure, cause)


def _merge_shares(share: dict[str, Any], failure: str | None, tmp: Path,
                  cause: BaseException | None) -> dict[str, Any]:
    """Collective: all ranks' checksums, or the first failure any rank had, raised on all."""
    gathered = all_gather_objects((share, failure))
    failure = _first(f for _s, f in gathered)
    if failure:
        _abort(tmp, failure, cause)
    return {name: c for each, _f in gathered for name, c in each.items()}


def _publish_on_rank0(tmp: Path, final: Path, checksums: dict[str, Any], keep_latest: int,
                      tensor_bytes: int) -> None:
    """Rank 0 writes the marker (with the checksums) and renames; every rank learns
    whether that worked before it moves on. Collective."""
    failure, cause = None, None
    if _rank() == 0:
        marker = {"step": int(_STEP_DIR.fullmatch(final.name).group(1)),
                  "world_size": _world_size(), "time": time.time(), "checksum": CHECKSUM,
                  "files": checksums}
        try:
            _write_synced(tmp / MARKER, json.dumps(marker) + "\n")
            _fsync_dir(tmp)
            _publish(tmp, final)
        except Exception as e:
            failure, cause = _save_failure(e, final, tensor_bytes), e
        else:
            if keep_latest > 0:
                _prune(final.parent, keep_latest, keep=final)
    _raise_agreed(failure, tmp, cause)


def _abort(tmp: Path, failure: str, cause: BaseException | None) -> None:
    """Remove the failed save's partial files (rank 0, once every rank stopped writing)
    and raise ``failure`` on every rank."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    raise CheckpointError(failure) from cause


# ------------------------------------------------------------------ disk space


def _save_failure(e: BaseException, final: Path, tensor_bytes: int) -> str:
    """The message for a failed save: lack of space said plainly, anything else as is.

    torch's writer reports a full disk as ``[enforce fail at inline_container.cc]`` with
    no errno, and DCP passes other ranks' errors on without their causes, so the free
    space left on the disk decides when no ENOSPC is found in the error itself."""
    ckpt_dir = final.parent
    if not _out_of_space(e, ckpt_dir):
        return f"saving checkpoint {final} failed: {_first_line(e)}"
    previous = find_latest(ckpt_dir)
    needed = max(tensor_bytes, _tree_bytes(previous) if previous else 0)
    tmp = final.with_name(final.name + ".tmp")
    free = shutil.disk_usage(ckpt_dir).free + _tree_bytes(tmp)  # once the partial save is gone
    return (f"no space left on {_mount_point(ckpt_dir)} while saving checkpoint {final.name} "
            f"in {ckpt_dir} (needed about {_size(needed)}, {_size(free)} free): the partial "
            "save was removed and the earlier checkpoints are kept. Free some space, lower "
            "checkpoint.keep_latest or move run.dir to a larger disk, then relaunch")


def _out_of_space(e: BaseException, directory: Path) -> bool:
    for exc in _exceptions_in(e):
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return False
    return usage.free < min(_LOW_SPACE, usage.total // 20)


def _exceptions_in(e: BaseException) -> Iterator[BaseException]:
    """``e``, its causes and contexts, and the per-rank failures a CheckpointException holds."""
    todo, seen = [e], set()
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        if isinstance(exc, CheckpointException):
            todo.extend(failure for failure, _trace in exc.failures.values())
        todo.extend((exc.__cause__, exc.__context__))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what DCP writes for it
    (a DTensor counts its global size, a replicated tensor one copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _tree_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ------------------------------------------------------------------ checksums


def _share(names: Any, rank: int, world: int) -> list[str]:
    """This rank's part of a file list: file i of the sorted list goes to rank i % world."""
    return sorted(names)[rank::world]


def _hash_share(root: Path, files: list[str]) -> dict[str, Any]:
    return _hash_files(root, _share(files, _rank(), _world_size()))


def _hash_files(root: Path, names: list[str]) -> dict[str, Any]:
    return {name: _file_checksum(root / name) for name in names}


def _file_checksum(path: Path) -> dict[str, Any]:
    """Size and CRC32 of one file, read in chunks into one reused buffer."""
    crc, size = 0, 0
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"bytes": size, CHECKSUM: f"{crc:08x}"}


def _list_files(root: Path) -> list[str]:
    """Every file a save wrote under ``root`` (DCP's and native ones), marker excluded."""
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MARKER)


def _verify_checksums(path: Path, marker: dict[str, Any], only: list[str] | None = None,
                      collective: bool = True) -> None:
    """Check the files (or ``only`` these) against the marker's sizes and CRC32s.

    ``collective``: each rank checks its share and every rank raises the same error (the
    first damaged file in rank order). Checkpoints saved before checksums pass unchecked.
    """
    recorded = marker.get("files")
    if not recorded:
        return
    names = set(recorded) if only is None else set(only) & set(recorded)
    rank, world = (_rank(), _world_size()) if collective else (0, 1)
    damage = [why for name in _share(names, rank, world)
              if (why := _damage(path, name, recorded[name]))]
    if collective:
        damage = [why for each in all_gather_objects(damage) for why in each]
    if damage:
        more = f" (and {len(damage) - 1} more damaged files)" if len(damage) > 1 else ""
        raise _corrupt(path, damage[0] + more)


def _damage(path: Path, name: str, expected: dict[str, Any]) -> str | None:
    """What is wrong with one file against its marker entry, or None."""
    file = path / name
    try:
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes where {expected['bytes']} were saved"
        if _file_checksum(file)[CHECKSUM] != expected[CHECKSUM]:
            return (f"{name} does not match the {CHECKSUM} recorded when it was saved (its "
                    "bytes changed on disk)")
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} is unreadable ({e.strerror})"
    return None


# ------------------------------------------------------------------ loading


def load(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``state`` in place; return its marker.

    Stateful values get ``load_state_dict``; plain dict values are replaced by the
    loaded dicts. Raises CheckpointError for a missing, incomplete, damaged (checksums)
    or crafted checkpoint, or one whose keys differ from ``state``'s; the same error on
    every rank. A DataError raised while loading the data loader's state is the data's
    problem, not the checkpoint's, and comes through unchanged.
    """
    path = Path(path)
    marker = _read_marker(path)
    _verify_checksums(path, marker)
    _read_checked_metadata(path)
    native, state = _split_native(state)
    for key in native:
        if not (path / key).is_dir():
            raise CheckpointError(
                f"checkpoint {path} has no {key}/ folder: it was written by another "
                "parallel.engine. Set checkpoint.resume=never to start afresh.")
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(path),
                     planner=_StrictLoadPlanner(path))
        for key, value in native.items():
            value.load_native(path / key)
    except (CheckpointError, DataError):
        raise
    except (Exception, CheckpointException) as e:
        raise _known_error(e, path) or _corrupt(path, f"reading it failed: {_first_line(e)}") from e
    return marker


def stored_model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shape of every model weight in the checkpoint at ``path``, keyed by parameter name.

    Reads (and verifies) only ``.metadata``; needs no process group. Raises
    CheckpointError for a missing, incomplete, damaged or crafted checkpoint, and for a
    DeepSpeed one, whose weights are in DeepSpeed's own files rather than in DCP's.
    """
    path = Path(path)
    marker = _read_marker(path)
    _verify_checksums(path, marker, only=[".metadata"], collective=False)
    return _model_shapes(path, _read_checked_metadata(path))


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the ``model`` entry of the checkpoint at ``path`` into ``model`` (one
    process, e.g. for export), ignoring optimizer, data and RNG state.

    Every weight of ``model`` must be in the checkpoint with its shape: a partial load
    that silently left initial weights in place would export an untrained model.
    """
    path = Path(path)
    marker = _read_marker(path)
    _verify_checksums(path, marker)
    stored = _model_shapes(path, _read_checked_metadata(path))
    target = ModelState(model)
    wrong = [f"model.{k}" for k, v in target.state_dict().items()
             if stored.get(k) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not hold this model's weights "
                              f"(missing or another shape: {_some(set(wrong))}); was it "
                              "written with another model.size or vocabulary?")
    try:
        with _single_process_quiet():
            dcp.load({"model": target}, storage_reader=SafeFileSystemReader(path),
                     planner=SafeLoadPlanner(allow_partial_load=True))
    except (Exception, CheckpointException) as e:
        raise _known_error(e, path) or _corrupt(path, f"reading it failed: {_first_line(e)}") from e


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = _complete_checkpoints(Path(ckpt_dir))
    return complete[-1][1] if complete else None


def complete_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``ckpt_dir``, oldest first."""
    return [step for step, _ in _complete_checkpoints(Path(ckpt_dir))]


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
    """Python, torch CPU and CUDA generator states.

    Put an instance under ``state["rng"]``: saving captures the generators, loading
    restores them. Python's Mersenne Twister state (version, 624 words, position) fits
    int64; the cached Gaussian of ``random.gauss`` is kept as (present, value).

    The keys are the same with and without CUDA, because the strict load planner refuses a
    checkpoint whose keys differ from the run's, and a GPU checkpoint must resume on a CPU
    host and the other way round. ``cuda_all`` holds one state per visible GPU (empty
    without CUDA) as lists of byte values: a DCP byte entry, whose length, unlike a
    tensor's shape, may differ between the saving and the loading process. (Its name is
    not the ``cuda`` of earlier checkpoints, a tensor, so those are refused with the
    planner's clear key mismatch rather than a type error.)
    """

    def state_dict(self) -> dict[str, Any]:
        version, words, gauss_next = random.getstate()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {
            "python": torch.tensor([version, *words], dtype=torch.int64),
            "python_gauss": torch.tensor(
                [gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
            "torch": torch.get_rng_state(),
            "cuda_all": [s.tolist() for s in cuda],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every generator; the CUDA ones only if the checkpoint has one state per
        GPU this process sees (else they keep their seeded state, with a warning)."""
        version, *words = state_dict["python"].tolist()
        has_gauss, gauss = state_dict["python_gauss"].tolist()
        random.setstate((version, tuple(words), gauss if has_gauss else None))
        torch.set_rng_state(state_dict["torch"].cpu())
        saved = state_dict["cuda_all"]
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if saved and len(saved) == visible:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in saved])
        elif saved or visible:
            warnings.warn(f"the checkpoint has CUDA RNG states for {len(saved)} GPU(s) and "
                          f"this process sees {visible}: the CUDA generators are not "
                          "restored and keep their seeded state", stacklevel=2)


# ------------------------------------------------------------------ load checks


class _StrictLoadPlanner(SafeLoadPlanner):
    """The safe planner, plus an error when the checkpoint's keys differ from the target's."""

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
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise _corrupt(path, f"it has no {MARKER}, so its save never finished") from None
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"its {MARKER} is unreadable: {e}") from e
    files = marker.get("files", {}) if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("bytes"), int)
            and isinstance(f.get(CHECKSUM), str) for f in files.values()):
        raise _corrupt(path, f"its {MARKER} is malformed")
    return marker


def _read_checked_metadata(path: Path) -> Metadata:
    """DCP's metadata, read safely, after checking that every byte range it points at
    exists (catches missing and truncated files in checkpoints without checksums)."""
    try:
        metadata = SafeFileSystemReader(path).read_metadata()
    except UnsafeContentError as e:
        raise _refused(path, e.what) from None
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
    return metadata


def _model_shapes(path: Path, metadata: Metadata) -> dict[str, tuple[int, ...]]:
    stored = metadata.state_dict_metadata
    shapes = {k.removeprefix("model."): tuple(v.size) for k, v in stored.items()
              if k.startswith("model.") and hasattr(v, "size")}
    if not shapes:
        raise CheckpointError(f"checkpoint {path} holds no DCP model weights (a "
                              "parallel.engine=deepspeed checkpoint keeps them in its own "
                              "format); export is available for ddp and fsdp checkpoints")
    return shapes


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is unusable: {why}. Delete it to resume from an older one, "
        "or set checkpoint.resume=never (or to another checkpoint's path).")


def _refused(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} contains objects a checkpoint never holds ({what}) and was not "
        "loaded: its files may have been crafted to run code when loaded, so do not open "
        "them with other tools either. Resume from a checkpoint you trust "
        "(checkpoint.resume=<its path>) or set checkpoint.resume=never.")


def _known_error(e: BaseException, path: Path) -> Exception | None:
    """An error that is not damage to the checkpoint, possibly inside the CheckpointException
    DCP wraps per-rank failures in: our key mismatch, a refused object (as its
    CheckpointError), or the data pipeline's DataError, which must reach the caller as is."""
    for exc in _exceptions_in(e):
        if isinstance(exc, (CheckpointError, DataError)):
            return exc
        if isinstance(exc, UnsafeContentError):
            return _refused(path, exc.what)
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
    """Delete older checkpoints. The new one is already published, so a deletion that
    fails is a warning, not a failed save (and rank 0 must not raise alone)."""
    complete = _complete_checkpoints(ckpt_dir)
    for _step, path in complete[:-keep_latest]:
        if path != keep:
            try:
                shutil.rmtree(path)
            except OSError as e:
                warnings.warn(f"could not delete old checkpoint {path}: {e}", stacklevel=2)


def _remove_scratch(ckpt_dir: Path) -> None:
    """Delete the .tmp/.old directories that crashed saves left behind.

    A complete ``step-N.old`` whose ``step-N`` is gone is the only copy of that checkpoint
    (a re-save of step N died between its two renames): it is put back, not deleted.
    """
    for child in list(ckpt_dir.iterdir()):
        stem, dot, suffix = child.name.rpartition(".")
        if not (dot and "." + suffix in _SCRATCH_SUFFIXES and _STEP_DIR.fullmatch(stem)):
            continue
        original = child.with_name(stem)
        if suffix == "old" and not original.exists() and (child / MARKER).is_file():
            os.replace(child, original)
        else:
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


def _rank() -> int:
    return dist.get_rank() if is_grouped() else 0


def _world_size() -> int:
    return dist.get_world_size() if is_grouped() else 1


def _first(items: Any) -> Any:
    return next((item for item in items if item), None)


def _async_group() -> Any:
    """The gloo group that DCP's background thread runs its collectives on, or None
    without a process group. A group of its own, because collectives issued from two
    threads on one group would interleave; gloo, because DCP's async save needs a CPU
    backend. Made once per default group (``new_group`` is collective, and every rank
    reaches the first ``save_async`` together)."""
    global _async_group_of
    if not is_grouped():
        return None
    world = dist.group.WORLD
    if _async_group_of is None or _async_group_of[0] is not world:
        _async_group_of = (world, new_cpu_group())
    return _async_group_of[1]


def _background() -> ThreadPoolExecutor:
    """One worker thread: it waits for DCP's upload and hashes; one save is in flight."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash")
    return _executor


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ------------------------------------------------------------------ run-level policy


def prune(ckpt_dir: str | Path, keep_latest: int, protect_step: int | None = None) -> None:
    """Delete all but the ``keep_latest`` newest complete checkpoints, except the newest
    one at or before ``protect_step`` (the last checkpoint known to be good, which a
    rollback may need). Rank 0 deletes; the others have nothing to wait for."""
    if _rank() != 0 or keep_latest <= 0:
        return
    complete = _complete_checkpoints(Path(ckpt_dir))
    keep = {path for _step, path in complete[-keep_latest:]}
    protected = [path for step, path in complete
                 if protect_step is not None and step <= protect_step]
    keep.update(protected[-1:])
    for _step, path in complete:
        if path not in keep:
            shutil.rmtree(path)


def set_aside(ckpt_dir: str | Path, from_step: int) -> list[Path]:
    """Rename complete checkpoints of step >= ``from_step`` to ``step-N.diverged`` (kept for
    inspection, never resumed from); return their new paths. Collective."""
    barrier()  # every rank lists the checkpoints before rank 0 renames any
    moved = []
    for step, path in _complete_checkpoints(Path(ckpt_dir)):
        if step >= from_step:
            target = path.with_name(path.name + ".diverged")
            if _rank() == 0:
                if target.exists():
                    shutil.rmtree(target)
                os.replace(path, target)
            moved.append(target)
    barrier()
    return moved


def remove_scratch(ckpt_dir: str | Path) -> None:
    """Delete what crashed saves left (step-N.tmp, step-N.old) before anything else runs,
    so a relaunch after a failed save gets its disk space back. Collective."""
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0 and ckpt_dir.is_dir():
        _remove_scratch(ckpt_dir)
    barrier()
