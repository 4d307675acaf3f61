"""`lotus-train data prepare`: tokenize a corpus once, in parallel, into a token store.

The main process reads documents (a C4-layout folder, one `.jsonl`/`.json`/`.txt` file
(gzipped or not), or a hub dataset) in source order and hands batches of them to a pool
of worker processes, each tokenizing on one core; results come back in order, so the
store is the same whatever the number of workers. Every document's ids are followed by
EOS, and the stream is cut into shards of `shard_tokens` tokens (see
`lotus_dist.data.store` for the layout).

Each shard is written under a temporary name, synced and renamed; then
`store-progress.json` records the position reached (source position after the document
that straddles the shard's end, its tokens not yet written, counts). An interrupted
prepare run again with the same arguments verifies the recorded shards, drops anything
after them and continues from there, producing the same bytes as an uninterrupted run.
The manifest is written last, and the progress file removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lotus_dist.data.sources import (
    HUB_CONFIGS,
    JSON_LINES_SUFFIXES,
    MAX_ERRORS_KEPT,
    TEXT_SUFFIXES,
    DataError,
    DocumentSource,
    HubDocuments,
    LocalDocuments,
    OnError,
    Position,
)
from lotus_dist.data.store import (
    DTYPES,
    PROGRESS_FILE,
    STORE_FORMAT,
    STORE_MANIFEST,
    STORE_TOKENIZER,
    STORE_VERSION,
    dtype_for,
    file_sha256,
    tokenizer_fingerprint,
)
from lotus_dist.data.tokenizer import TextTokenizer, load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 26
"""64M tokens: 128 MB per uint16 shard (a size parallel file systems like); a few
thousand shards for C4's English train split."""
_TASK_BYTES = 256 * 1024  # text per worker task: large enough to amortise the IPC
_TASK_DOCS = 1024
_SPLIT_NAME = re.compile(r"[\w.-]+")


class PrepareInterrupted(RuntimeError):
    """Raised by `prepare_store(stop_after_shards=k)` after k shards (for tests)."""


# ----------------------------------------------------------------- worker processes

_worker_tokenizer: TextTokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, eos_token: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Pool.terminate() ends a worker with SIGTERM: keep its default action (a spawned
    # worker could otherwise carry a handler over); Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    from tokenizers import Tokenizer

    _worker_tokenizer = TextTokenizer(Tokenizer.from_str(tokenizer_json), eos_token)
    _worker_dtype = DTYPES[dtype]


def _encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """(every document's ids then EOS, concatenated; each document's length with EOS;
    the CPU seconds it took)."""
    assert _worker_tokenizer is not None and _worker_dtype is not None
    cpu = time.process_time()
    eos = _worker_tokenizer.eos_id
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, ids in enumerate(_worker_tokenizer.encode_batch(texts)):
        flat.extend(ids)
        flat.append(eos)
        lengths[i] = len(ids) + 1
    return np.array(flat, dtype=_worker_dtype), lengths, time.process_time() - cpu


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _context() -> Any:
    """Workers come from a fork server: a clean process (no threads, default signal
    handlers) started once per parent process, with this module imported, from which
    each worker is forked in milliseconds. Forking the parent itself would copy its
    threads' locks and its signal handlers (a trainer's, a test runner's); spawning
    each worker would import torch in each."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def start_worker_server() -> None:
    """Start the fork server now (it takes about the time of importing lotus_dist)
    rather than at the first prepare, e.g. to time prepares without it."""
    with _environment("TOKENIZERS_PARALLELISM", "false"):
        pool = _context().Pool(1)  # returns once a worker could be forked: the server is up
    pool.close()
    pool.join()


def _pool(workers: int, tokenizer: TextTokenizer, dtype: str) -> Any:
    """`workers` tokenizer processes."""
    eos_token = tokenizer.tokenizer.id_to_token(tokenizer.eos_id)
    # The server and its workers start with the tokenizer's own threads off.
    with _environment("TOKENIZERS_PARALLELISM", "false"):
        return _context().Pool(workers, _init_worker,
                               (tokenizer.tokenizer.to_str(), eos_token, dtype))


# ----------------------------------------------------------------- reading tasks

@dataclass
class _Task:
    """Documents read together, with where the source stood after each."""

    texts: list[str] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    errors: list[list[dict[str, Any]]] = field(default_factory=list)
    """Per document: the skips met while reading up to it."""
    size: int = 0


def _new_errors(source: DocumentSource, new: int) -> list[dict[str, Any]]:
    """The last `new` errors the source recorded (those it still holds)."""
    kept = list(source.errors)
    return kept[len(kept) - min(new, len(kept)):] if new else []


def _tasks(source: DocumentSource) -> Iterator[_Task]:
    """The source's documents in tasks, then one task without documents that carries
    the skips after the last document."""
    task = _Task()
    seen = source.errors_total
    for text in source:
        task.texts.append(text)
        task.positions.append(source.position())
        task.skipped.append(source.skipped)
        task.errors.append(_new_errors(source, source.errors_total - seen))
        seen = source.errors_total
        task.size += len(text)
        if task.size >= _TASK_BYTES or len(task.texts) >= _TASK_DOCS:
            yield task
            task = _Task()
    if task.texts:
        yield task
    yield _Task(skipped=[source.skipped],
                errors=[_new_errors(source, source.errors_total - seen)])


# ----------------------------------------------------------------- progress display

class _Progress:
    """tokens/s and an ETA: a tqdm bar on a terminal, else a line every 10 s."""

    def __init__(self, split: str, total: int | None, unit: str, enabled: bool) -> None:
        self.split, self.total, self.unit = split, total, unit
        self.enabled = enabled
        self.start = time.perf_counter()
        self._last_line = self.start
        self._first: int | None = None  # `done` at the first update (a resumed prepare)
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, unit_scale=True, desc=split,
                             file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, tokens: int) -> None:
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = tokens / elapsed
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix_str(f"{_si(tokens)} tokens, {_si(rate)} tok/s", refresh=False)
            return
        if self._first is None:
            self._first = done
        now = time.perf_counter()
        if now - self._last_line < 10:
            return
        self._last_line = now
        eta = ""
        if self.total and done > self._first:
            left = elapsed * (self.total - done) / (done - self._first)
            eta = f", {100 * done / self.total:.0f}%, ETA {_duration(left)}"
        print(f"prepare {self.split}: {_si(tokens)} tokens, {_si(rate)} tok/s{eta}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _si(x: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f}{suffix}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------- files

def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, sync, rename: `path` is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# ----------------------------------------------------------------- one split

class _SplitWriter:
    """The state of one split being written: shards done, the buffer, counts."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 state: dict[str, Any]) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = list(state["shards"])
        self.documents: int = state["documents"]
        self.skipped: int = state["skipped_records"]
        self.errors: list[dict[str, Any]] = list(state["data_errors"])
        self.max_token_id: int = state["max_token_id"]
        self.position: Position = state["source"]
        carry = np.array(state["carry"], dtype=dtype)
        self.buffer: list[np.ndarray] = [carry] if len(carry) else []
        self.buffered = len(carry)
        self.written = sum(s["tokens"] for s in self.shards)

    @property
    def tokens(self) -> int:
        return self.written + self.buffered

    def add_errors(self, errors: list[dict[str, Any]]) -> None:
        room = MAX_ERRORS_KEPT - len(self.errors)
        if room > 0:
            self.errors.extend(errors[:room])

    def append(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)

    def full(self) -> bool:
        return self.buffered >= self.shard_tokens

    def write_shard(self, final: bool = False) -> None:
        """Write the first shard_tokens buffered tokens (all of them if `final`)."""
        data = np.concatenate(self.buffer) if len(self.buffer) != 1 else self.buffer[0]
        size = len(data) if final else self.shard_tokens
        shard, rest = data[:size], data[size:]
        name = f"{self.split}-{len(self.shards):05d}.bin"
        payload = shard.astype(self.dtype, copy=False).tobytes()
        _atomic_write(self.out / name, payload)
        self.shards.append({"file": name, "tokens": int(size),
                            "sha256": hashlib.sha256(payload).hexdigest()})
        self.written += int(size)
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)

    def state(self) -> dict[str, Any]:
        """Where a resumed prepare continues (valid right after a document was added)."""
        carry = np.concatenate(self.buffer) if self.buffer else np.empty(0, self.dtype)
        return {"split": self.split, "shards": self.shards, "documents": self.documents,
                "skipped_records": self.skipped, "data_errors": self.errors,
                "max_token_id": self.max_token_id, "source": self.position,
                "carry": carry.tolist()}

    def summary(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.written,
                "skipped_records": self.skipped, "data_errors": self.errors,
                "max_token_id": self.max_token_id, "shards": self.shards}


def _fresh_state(split: str) -> dict[str, Any]:
    return {"split": split, "shards": [], "documents": 0, "skipped_records": 0,
            "data_errors": [], "max_token_id": -1, "source": None, "carry": []}


def _recorded_shards_intact(out: Path, state: dict[str, Any], itemsize: int) -> bool:
    """The shards a progress file lists: all present at their size, the last one hashed."""
    for shard in state["shards"]:
        path = out / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
            return False
    return not state["shards"] or \
        file_sha256(out / state["shards"][-1]["file"]) == state["shards"][-1]["sha256"]


def _is_store_file(name: str) -> bool:
    """A name a store (or an unfinished one) has: shards, its tokenizer, temporaries."""
    return name.endswith(".bin") or name == STORE_TOKENIZER or name.endswith(".tmp")


def _remove_shards_from(out: Path, split: str, first: int) -> None:
    """Shards of `split` numbered `first` and up: written after the last recorded one."""
    pattern = re.compile(rf"{re.escape(split)}-(\d+)\.bin")
    for path in out.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= first:
            path.unlink()


# ----------------------------------------------------------------- the entry point

def _cpus() -> int:
    """CPUs this process may run on (its affinity, which a container or job limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _settings(source: str, hub_config: str | None, splits: list[str], tokenizer_name: str,
              tokenizer: TextTokenizer, dtype: str, shard_tokens: int, max_tokens: int | None,
              on_error: str) -> dict[str, Any]:
    """What decides a store's bytes: a prepare resumes only with the same."""
    return {
        "source": source, "hub_config": hub_config, "splits": splits,
        "tokenizer": {"name": tokenizer_name, "sha256": tokenizer_fingerprint(tokenizer),
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": dtype, "shard_tokens": shard_tokens, "max_tokens": max_tokens,
        "on_error": on_error,
    }


def _manifest(settings: dict[str, Any], splits: dict[str, Any]) -> dict[str, Any]:
    """The manifest: format, the settings, then each split's summary."""
    return {"format": STORE_FORMAT, "version": STORE_VERSION,
            **{k: v for k, v in settings.items() if k != "splits"}, "splits": splits}


def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed prepare must match: all but the tokenizer's name (the same
    tokenizer given by another path is the same tokenizer: its sha256 decides)."""
    tokenizer = {k: v for k, v in (settings.get("tokenizer") or {}).items() if k != "name"}
    return {**settings, "tokenizer": tokenizer}


def write_token_store(
    out: str | os.PathLike,
    splits: dict[str, np.ndarray],
    tokenizer: TextTokenizer,
    tokenizer_name: str = "",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = "tokens",
) -> dict[str, Any]:
    """A store holding the given token streams (split name -> ids, EOS included), as
    `prepare_store` lays it out; returns the manifest. For tests and benchmarks, and
    for streams made elsewhere."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(tokenizer.vocab_size)
    settings = _settings(source, None, list(splits), tokenizer_name, tokenizer, dtype,
                         shard_tokens, None, "skip")
    done = {}
    for name, tokens in splits.items():
        tokens = np.asarray(tokens)
        if not len(tokens):
            raise ValueError(f"split {name!r} has no tokens")
        writer = _SplitWriter(out, name, DTYPES[dtype], shard_tokens, _fresh_state(name))
        writer.append(tokens.astype(DTYPES[dtype]))
        writer.documents = int(np.count_nonzero(tokens == tokenizer.eos_id))
        writer.max_token_id = int(tokens.max())
        while writer.full():
            writer.write_shard()
        if writer.buffered:
            writer.write_shard(final=True)
        done[name] = writer.summary()
    tokenizer.tokenizer.save(str(out / STORE_TOKENIZER))
    manifest = _manifest(settings, done)
    _atomic_write(out / STORE_MANIFEST, _json_bytes(manifest))
    return manifest


def open_prepare_source(data: str, split: str, on_error: OnError,
                        hub_config: str | None = None) -> DocumentSource:
    """`--data` as a source: a local file (the whole split), folder, or hub name."""
    path = Path(data).expanduser()
    if path.is_file():
        if not path.name.endswith(JSON_LINES_SUFFIXES + TEXT_SUFFIXES):
            raise DataError(f"--data {data}: a file must end in one of "
                            f"{', '.join(JSON_LINES_SUFFIXES + TEXT_SUFFIXES)}")
        return LocalDocuments(path, split, on_error, files=[path])
    if path.exists() or not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", data):
        return LocalDocuments(path, split, on_error)
    return HubDocuments(data, split, hub_config or HUB_CONFIGS.get(data), on_error)


def prepare_store(
    data: str,
    tokenizer: str,
    out: str | os.PathLike,
    splits: list[str] | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    on_error: OnError = "skip",
    hub_config: str | None = None,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """Tokenize `data` with `tokenizer` into the store `out`; return a summary:
    {"manifest", "seconds", "tokens" (tokenized by this call), "tokens_per_s",
    "workers", "worker_cpu_s" (the workers' CPU time on tasks whose tokens were used),
    "main_cpu_s" (this process's: reading, writing), "resumed", "already_done"}.

    `splits` defaults to train and validation (train only for a single file, which is
    one split). `max_tokens` caps each split. `workers` defaults to the CPU count.
    An `out` that holds an unfinished prepare with the same settings is continued; a
    finished one with the same settings is left as is. `stop_after_shards` stops with
    PrepareInterrupted after that many shards (to test resuming).
    """
    start, main_cpu = time.perf_counter(), time.process_time()
    is_file = Path(data).expanduser().is_file()
    splits = list(splits) if splits else (["train"] if is_file else ["train", "validation"])
    if len(set(splits)) != len(splits) or not all(_SPLIT_NAME.fullmatch(s) for s in splits):
        raise ValueError(f"--split {','.join(splits)}: give distinct split names")
    if is_file and len(splits) != 1:
        raise ValueError(f"--data {data} is one file, so it is one split: give one --split "
                         f"(not {','.join(splits)})")
    workers = workers or _cpus()
    if workers < 1 or shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError("--workers, --shard-tokens and --max-tokens must be positive")
    text_tokenizer = load_tokenizer(tokenizer)
    dtype = dtype_for(text_tokenizer.vocab_size)
    settings = _settings(str(data), hub_config, splits, str(tokenizer), text_tokenizer, dtype,
                         shard_tokens, max_tokens, on_error)
    out = Path(out).expanduser()
    manifest_path, progress_path = out / STORE_MANIFEST, out / PROGRESS_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        # The manifest's "splits" maps each split named in the settings to its summary.
        if _identity({**{k: manifest.get(k) for k in settings},
                      "splits": list(manifest["splits"])}) != _identity(settings):
            raise DataError(f"--out {out} already holds a token store prepared with other "
                            "settings; remove it or choose another --out")
        return {"manifest": manifest, "seconds": time.perf_counter() - start, "tokens": 0,
                "tokens_per_s": 0.0, "workers": workers, "worker_cpu_s": 0.0,
                "main_cpu_s": time.process_time() - main_cpu, "resumed": False,
                "already_done": True}
    progress_state: dict[str, Any] = {"settings": settings, "done": {}, "current": None}
    resumed = False
    if progress_path.is_file():
        saved = json.loads(progress_path.read_text())
        if _identity(saved.get("settings", {})) != _identity(settings):
            raise DataError(
                f"--out {out} holds an unfinished prepare with other settings (source, "
                "tokenizer, splits, --max-tokens, --shard-tokens or --on-error differ); run "
                "it with the same arguments to finish it, or remove the folder")
        progress_state, resumed = saved, True
    elif out.exists() and not all(_is_store_file(p.name) for p in out.iterdir()):
        raise DataError(f"--out {out} exists and holds files that are not a token store's; "
                        "choose an empty or new folder")
    for split in splits:  # a missing corpus or split fails before anything is written
        if split not in progress_state["done"]:
            open_prepare_source(str(data), split, on_error, hub_config)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    text_tokenizer.tokenizer.save(str(out / f".{STORE_TOKENIZER}.tmp"))
    os.replace(out / f".{STORE_TOKENIZER}.tmp", out / STORE_TOKENIZER)
    _atomic_write(progress_path, _json_bytes(progress_state))

    counter: dict[str, Any] = {"tokens": 0, "shards": 0, "worker_cpu_s": 0.0}
    pool = _pool(workers, text_tokenizer, dtype)
    try:
        for split in splits:
            if split in progress_state["done"]:
                continue
            _prepare_split(data, split, out, settings, progress_state, pool, workers,
                           progress, counter, stop_after_shards)
    finally:
        pool.terminate()
        pool.join()
    manifest = _manifest(progress_state["settings"],  # a resumed prepare keeps the first's
                         {split: progress_state["done"][split] for split in splits})
    _atomic_write(manifest_path, _json_bytes(manifest))
    progress_path.unlink()
    seconds = time.perf_counter() - start
    return {"manifest": manifest, "seconds": seconds, "tokens": counter["tokens"],
            "tokens_per_s": counter["tokens"] / max(seconds, 1e-9), "workers": workers,
            "worker_cpu_s": counter["worker_cpu_s"],
            "main_cpu_s": time.process_time() - main_cpu,
            "resumed": resumed, "already_done": False}


def _prepare_split(data: str, split: str, out: Path, settings: dict[str, Any],
                   progress_state: dict[str, Any], pool: Any, workers: int, show: bool,
                   counter: dict[str, int], stop_after_shards: int | None) -> None:
    dtype = DTYPES[settings["dtype"]]
    state = progress_state["current"]
    if state is None or state["split"] != split or not _recorded_shards_intact(
            out, state, dtype.itemsize):
        state = _fresh_state(split)
    _remove_shards_from(out, split, len(state["shards"]))
    writer = _SplitWriter(out, split, dtype, settings["shard_tokens"], state)
    max_tokens = settings["max_tokens"]
    source = open_prepare_source(data, split, settings["on_error"], settings["hub_config"])
    source.seek(state["source"])
    source.skipped = state["skipped_records"]
    by_bytes = isinstance(source, LocalDocuments) and max_tokens is None
    bar = (_Progress(split, source.total_bytes(), "B", show) if by_bytes
           else _Progress(split, max_tokens, "tok", show))
    start_tokens = writer.tokens

    def record() -> None:
        progress_state["current"] = writer.state()
        _atomic_write(out / PROGRESS_FILE, _json_bytes(progress_state))
        counter["shards"] += 1
        if stop_after_shards is not None and counter["shards"] >= stop_after_shards:
            raise PrepareInterrupted(f"stopped after {counter['shards']} shards (as asked)")

    def add_document(tokens: np.ndarray, task: _Task, j: int) -> None:
        writer.append(tokens)
        writer.documents += 1
        writer.max_token_id = max(writer.max_token_id, int(tokens.max()))
        writer.skipped = task.skipped[j]
        writer.add_errors(task.errors[j])
        writer.position = task.positions[j]
        while writer.full():
            writer.write_shard()
            record()

    in_flight: deque[tuple[_Task, Any]] = deque()
    tasks = _tasks(source)
    reading = True
    finished = max_tokens is not None and writer.tokens >= max_tokens
    while not finished:
        while reading and len(in_flight) < 2 * workers + 2:
            task = next(tasks, None)
            if task is None:
                reading = False
                break
            in_flight.append((task, pool.apply_async(_encode_task, (task.texts,))
                              if task.texts else None))
        if not in_flight:
            break
        task, pending = in_flight.popleft()
        if pending is None:  # the skips after the last document
            writer.skipped = task.skipped[-1]
            writer.add_errors(task.errors[-1])
            break
        flat, lengths, cpu = pending.get()
        counter["worker_cpu_s"] += cpu
        room = None if max_tokens is None else max_tokens - writer.tokens
        if writer.buffered + len(flat) < writer.shard_tokens and (room is None
                                                                   or len(flat) < room):
            writer.append(flat)  # the common case: the whole task fits in this shard
            writer.documents += len(lengths)
            writer.max_token_id = max(writer.max_token_id, int(flat.max()))
            writer.skipped = task.skipped[len(lengths) - 1]
            for errors in task.errors[: len(lengths)]:
                writer.add_errors(errors)
            writer.position = task.positions[-1]
        else:
            ends = np.cumsum(lengths)
            for j, end in enumerate(ends.tolist()):
                tokens = flat[end - lengths[j]: end]
                if max_tokens is not None:
                    tokens = tokens[: max_tokens - writer.tokens]
                add_document(tokens, task, j)
                if max_tokens is not None and writer.tokens >= max_tokens:
                    finished = True
                    break
        done = source.bytes_read() if by_bytes else writer.tokens
        bar.update(done, writer.tokens - start_tokens)
    bar.close()
    if writer.buffered:
        writer.write_shard(final=True)
    if not writer.shards:
        raise DataError(f"--data {data}: the {split!r} split gave no tokens")
    counter["tokens"] += writer.tokens - start_tokens
    progress_state["done"][split] = writer.summary()
    progress_state["current"] = None
    _atomic_write(out / PROGRESS_FILE, _json_bytes(progress_state))
    counter["shards"] += 1  # the split's last shard, recorded with the split
    if stop_after_shards is not None and counter["shards"] >= stop_after_shards:
        raise PrepareInterrupted(f"stopped after {counter['shards']} shards (as asked)")
