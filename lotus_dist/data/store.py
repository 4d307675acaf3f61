"""A prepared token store: memory-mapped token shards that feed every rank at O(1/W) cost.

Layout of a store folder (written by `lotus_dist.data.prepare`):

    store-manifest.json      format, tokenizer fingerprint, source, splits (written last)
    tokenizer.json           the tokenizer the tokens came from
    train-00000.bin ...      the split's token stream: every document's ids, then EOS,
    validation-00000.bin     in source order, cut into shards of `shard_tokens` tokens
                             (the last shorter), little-endian uint16 (uint32 when the
                             vocabulary needs it)

Training reads it as blocks of seq_len + 1 consecutive tokens of the split's stream
(block k is tokens [k(L+1), (k+1)(L+1)), the same cut as the streaming loader). The
global order of blocks is epoch after epoch of a seeded permutation (`Permutation`,
keyed by (seed, epoch)); with data.shuffle=false it is the file order. Global batch i
is positions [iB, (i+1)B) of that order, and rank r of W reads only its rows
[iB + rB/W, iB + (r+1)B/W): its cost per step is B/W blocks whatever W is, and the
batches do not depend on W. The resume state is the position in that order (the
global batch index and epoch): O(1), valid on any world size.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lotus_dist.data.loader import EvalBatches, check_batch_layout
from lotus_dist.data.permute import Permutation
from lotus_dist.data.sources import DataError
from lotus_dist.data.tokenizer import TextTokenizer

STORE_MANIFEST = "store-manifest.json"
"""The file that makes a folder a token store; written last, so its presence means done."""
PROGRESS_FILE = "store-progress.json"
"""Where an unfinished prepare keeps its position (removed when the manifest is written)."""
STORE_TOKENIZER = "tokenizer.json"
STORE_FORMAT = "lotus-token-store"
STORE_VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Positions of the order computed at once per rank: amortises the permutation's numpy
# overhead when a rank's slice of a batch is only a few rows.
_ORDER_WINDOW = 4096
_MIN_OPEN_SHARDS = 64
_FD_RESERVE = 256  # descriptors left for everything else in the process


def _open_shard_limit(shards: int) -> int:
    """How many shards to keep mapped at once. Each map holds a file descriptor (Python's
    mmap keeps a duplicate), and a shuffled batch touches shards all over the split, so
    this raises the soft RLIMIT_NOFILE towards the hard limit when the split has more
    shards than it allows, and keeps the rest in an LRU."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = shards + _FD_RESERVE + 1024
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new_soft = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
            if new_soft > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
                soft = new_soft
    except (ImportError, ValueError, OSError):  # no resource module, or not allowed
        return _MIN_OPEN_SHARDS
    if soft == resource.RLIM_INFINITY:
        return shards
    return max(_MIN_OPEN_SHARDS, min(shards, (soft - _FD_RESERVE) // 2))


def tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    """sha256 of the tokenizer's serialised form: equal exactly when it encodes alike."""
    return hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()


def dtype_for(vocab_size: int) -> str:
    """The narrowest token dtype that holds every id below `vocab_size`."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_token_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished token store (a folder with its manifest)."""
    return (Path(path).expanduser() / STORE_MANIFEST).is_file()


def is_unfinished_store(path: str | os.PathLike) -> bool:
    """Whether `path` holds a prepare that was interrupted (progress, no manifest)."""
    folder = Path(path).expanduser()
    return (folder / PROGRESS_FILE).is_file() and not (folder / STORE_MANIFEST).is_file()


@dataclass
class StoreSplit:
    """One split of a store: its shards, memory-mapped on first use."""

    root: Path
    name: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict[str, Any]]
    """[{"file", "tokens", "sha256"}] in stream order."""
    documents: int = 0
    skipped_records: int = 0
    data_errors: list[dict[str, Any]] = field(default_factory=list)
    max_token_id: int = -1
    _maps: OrderedDict[int, np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _capacity: int | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return sum(shard["tokens"] for shard in self.shards)

    @property
    def fingerprint(self) -> str:
        """Names this split's content (its shards' hashes), for resume checks."""
        joined = "".join(shard["sha256"] for shard in self.shards)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def check_files(self) -> None:
        """Every shard present with the size the manifest gives (O(shards) stat calls);
        a DataError naming the first that is not."""
        if not self.shards:
            raise DataError(f"token store {self.root}: the {self.name!r} split has no shards")
        for i, shard in enumerate(self.shards):
            if i < len(self.shards) - 1 and shard["tokens"] != self.shard_tokens:
                raise DataError(f"token store {self.root}: manifest lists {shard['file']} with "
                                f"{shard['tokens']} tokens, not shard_tokens="
                                f"{self.shard_tokens}; the manifest is damaged")
            path = self.root / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(
                    f"token store {self.root}: shard {path} is missing. Prepare the store "
                    "again (remove the folder and rerun lotus-train data prepare)") from None
            if size != expected:
                raise DataError(
                    f"token store {self.root}: shard {path} has {size} bytes, the manifest "
                    f"says {expected} ({shard['tokens']} {self.dtype.name} tokens): it is "
                    f"{'truncated' if size < expected else 'too long'}. Prepare the store "
                    "again (remove the folder and rerun lotus-train data prepare)")

    def verify(self) -> None:
        """Hash every shard against the manifest (reads the whole split)."""
        self.check_files()
        for shard in self.shards:
            path = self.root / shard["file"]
            if file_sha256(path) != shard["sha256"]:
                raise DataError(f"token store {self.root}: shard {path} does not match its "
                                "sha256 in the manifest: it is corrupt; prepare the store again")

    def _map(self, index: int) -> np.ndarray:
        """Shard `index` as a read-only array over its memory map (a plain ndarray:
        slicing it costs less than slicing an np.memmap)."""
        cached = self._maps.get(index)
        if cached is not None:
            self._maps.move_to_end(index)
            return cached
        shard = self.shards[index]
        with open(self.root / shard["file"], "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        array = np.frombuffer(mapped, dtype=self.dtype, count=shard["tokens"])
        self._maps[index] = array
        if self._capacity is None:
            self._capacity = _open_shard_limit(len(self.shards))
        if len(self._maps) > self._capacity:
            self._maps.popitem(last=False)  # unmapped once no batch views it
        return array

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream (across shards), copied."""
        out = np.empty(stop - start, dtype=self.dtype)
        done = 0
        while start < stop:
            index = start // self.shard_tokens
            offset = start - index * self.shard_tokens
            take = min(stop - start, self.shards[index]["tokens"] - offset)
            out[done: done + take] = self._map(index)[offset: offset + take]
            start, done = start + take, done + take
        return out

    def read_blocks(self, blocks: np.ndarray, block_len: int) -> np.ndarray:
        """Blocks `blocks` (indices) of `block_len` tokens, as an array [len, block_len]."""
        out = np.empty((len(blocks), block_len), dtype=self.dtype)
        size = self.shard_tokens
        maps: dict[int, np.ndarray] = {}
        for row, block in enumerate(blocks.tolist()):
            start = block * block_len
            index, offset = divmod(start, size)
            if offset + block_len <= size:  # one slice copy per row
                shard = maps.get(index)
                if shard is None:
                    shard = maps[index] = self._map(index)
                out[row] = shard[offset: offset + block_len]
            else:  # the few blocks across a shard edge
                out[row] = self.read_tokens(start, start + block_len)
        return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class TokenStore:
    """A finished store: its manifest, and its splits (`split(name)`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = Path(path).expanduser()
        manifest_path = self.root / STORE_MANIFEST
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            hint = (" (a prepare was interrupted there: run the same lotus-train data prepare "
                    "command again to finish it)" if is_unfinished_store(self.root) else "")
            raise DataError(f"{self.root} is not a token store: no {STORE_MANIFEST}{hint}") \
                from None
        except (OSError, ValueError) as err:
            raise DataError(f"token store {self.root}: cannot read {STORE_MANIFEST}: {err}") \
                from err
        m = self.manifest
        if m.get("format") != STORE_FORMAT or m.get("version") != STORE_VERSION:
            raise DataError(
                f"token store {self.root}: format {m.get('format')!r} version "
                f"{m.get('version')!r}, but this version reads {STORE_FORMAT!r} version "
                f"{STORE_VERSION}; prepare the store again")
        if m.get("dtype") not in DTYPES:
            raise DataError(f"token store {self.root}: unknown dtype {m.get('dtype')!r}")
        self.dtype = DTYPES[m["dtype"]]
        self.shard_tokens = int(m["shard_tokens"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def tokenizer(self) -> dict[str, Any]:
        """{"name", "sha256", "vocab_size", "eos_id"} of the tokenizer the store holds."""
        return self.manifest["tokenizer"]

    def split(self, name: str) -> StoreSplit:
        """One split, its files checked (present, right size); DataError if it is absent."""
        info = self.manifest["splits"].get(name)
        if info is None:
            raise DataError(
                f"token store {self.root} has no {name!r} split (it holds "
                f"{', '.join(self.splits) or 'none'}); prepare it with --split "
                f"{','.join([*self.splits, name])}")
        split = StoreSplit(self.root, name, self.dtype, self.shard_tokens, info["shards"],
                           documents=info["documents"],
                           skipped_records=info["skipped_records"],
                           data_errors=info["data_errors"], max_token_id=info["max_token_id"])
        split.check_files()
        return split

    def check_tokenizer(self, tokenizer: TextTokenizer, name: str) -> None:
        """DataError unless `tokenizer` (data.tokenizer=`name`) is the store's."""
        stored = self.tokenizer
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != stored["sha256"] or tokenizer.vocab_size != stored["vocab_size"]:
            raise DataError(
                f"data.tokenizer={name!r} ({tokenizer.vocab_size} ids, sha256 "
                f"{fingerprint[:12]}) is not the tokenizer the token store {self.root} was "
                f"prepared with ({stored['name']!r}: {stored['vocab_size']} ids, sha256 "
                f"{stored['sha256'][:12]}); set data.tokenizer={self.root / STORE_TOKENIZER} "
                "or prepare the store again with this tokenizer")
        if tokenizer.eos_id != stored["eos_id"]:
            raise DataError(f"data.tokenizer={name!r} has EOS id {tokenizer.eos_id}, the store "
                            f"{self.root} was prepared with EOS id {stored['eos_id']}")

    def check_vocab(self, vocab_size: int) -> None:
        """DataError if a token id in the store would not fit a model of `vocab_size`."""
        for name in self.splits:
            top = self.manifest["splits"][name]["max_token_id"]
            if top >= vocab_size:
                raise DataError(
                    f"token store {self.root}: the {name!r} split holds token id {top}, which "
                    f"a model with vocab_size={vocab_size} cannot embed; set model.vocab_size "
                    f"to at least {top + 1} (or null to take the tokenizer's)")


class StoreBatches:
    """This rank's rows of each global batch of a store split, as
    LongTensor[global_batch / world_size, seq_len + 1]: a drop-in for PackedBatches.

    Epochs follow each other without a gap (a batch can span an epoch boundary), each
    with its own permutation; with `repeat=False` the iterator stops at the first batch
    that would go past the end of the split (the evaluation batches).
    """

    def __init__(
        self,
        split: StoreSplit,
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        vocab_size: int | None = None,
    ) -> None:
        check_batch_layout(seq_len, global_batch, rank, world_size)
        self.split = split
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.vocab_size = vocab_size
        self.blocks = split.tokens // (seq_len + 1)
        if self.blocks < global_batch:
            raise DataError(
                f"token store {split.root}: the {split.name!r} split has {split.tokens} tokens, "
                f"{self.blocks} blocks of training.seq_len+1={seq_len + 1}, fewer than one "
                f"global batch of training.batch_size={global_batch}; prepare more data or "
                "lower training.batch_size")
        self._fingerprint = split.fingerprint  # hashed once: state_dict runs every batch
        self._position = 0  # blocks of the global order before the next batch
        self._window: tuple[int, np.ndarray] | None = None  # (first batch, block ids)
        self._errors_reported = False

    # ----------------------------------------------------------- PackedBatches' protocol

    @property
    def skipped_records(self) -> int:
        """Bad records the prepare skipped in this split (from the manifest)."""
        return self.split.skipped_records

    @property
    def data_errors(self) -> list[dict[str, Any]]:
        """The skips the prepare recorded (at most `MAX_ERRORS_KEPT`)."""
        return list(self.split.data_errors)

    def new_data_errors(self) -> list[dict[str, Any]]:
        """The prepare's skips on the first call (so a run logs what its store lacks),
        nothing after: training from a store reads no new bad data."""
        if self._errors_reported:
            return []
        self._errors_reported = True
        return self.data_errors

    def __iter__(self) -> StoreBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.repeat and self._position + self.global_batch > self.blocks:
            raise StopIteration
        rows = self.split.read_blocks(self._block_ids(), self.seq_len + 1)
        self._position += self.global_batch
        if self.vocab_size is not None and rows.size and int(rows.max()) >= self.vocab_size:
            raise DataError(
                f"token store {self.split.root}: the {self.split.name!r} split holds token id "
                f"{int(rows.max())} near block position {self._position - self.global_batch}, "
                f"beyond the model's vocab_size={self.vocab_size}: a shard is corrupt "
                "(prepare the store again)")
        return torch.from_numpy(rows.astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        """The global position, the same on every rank: `batch` (global batches done),
        `epoch` and `offset` (blocks into it), `position` (blocks of the order done);
        `seq_len`, `seed`, `shuffle`, `blocks`, `store` are checked on load."""
        return {"kind": "token_store", "batch": self._position // self.global_batch,
                "epoch": self._position // self.blocks, "offset": self._position % self.blocks,
                "position": self._position, "global_batch": self.global_batch,
                "skipped_records": self.skipped_records, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state`; O(1). A different training.batch_size continues from
        the same position in the order (the remaining blocks regroup into new batches)."""
        if state.get("kind") != "token_store":
            raise ValueError(
                "the data-loader state was saved by the streaming loader (data.path was a "
                "corpus folder or a hub name); it cannot continue on a prepared token store. "
                "Set data.path back to that corpus to resume, or start a new run.dir")
        changed = [f"{key}={state.get(key)!r} (now {value!r})"
                   for key, value in self._layout().items() if state.get(key) != value]
        if changed:
            raise ValueError(
                f"the data-loader state was saved with {', '.join(changed)}; resuming would "
                "not replay the same batches")
        self._position = int(state["position"])
        self._window = None

    # ----------------------------------------------------------- the order

    def _layout(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "blocks": self.blocks, "store": self._fingerprint}

    def _block_ids(self) -> np.ndarray:
        """This rank's block indices for the next batch (from a window of batches)."""
        batch = self._position // self.global_batch
        aligned = self._position % self.global_batch == 0
        if not aligned:  # resumed with another batch size: compute this batch alone
            return self._order(self._position + self.rank * self.local_batch
                               + np.arange(self.local_batch)[None, :])[0]
        if self._window is None or not (
                self._window[0] <= batch < self._window[0] + len(self._window[1])):
            count = max(1, _ORDER_WINDOW // self.local_batch)
            first = (batch + np.arange(count, dtype=np.int64)[:, None]) * self.global_batch
            positions = first + self.rank * self.local_batch + np.arange(self.local_batch)
            self._window = (batch, self._order(positions))
        return self._window[1][batch - self._window[0]]

    def _order(self, positions: np.ndarray) -> np.ndarray:
        """Block index at each position of the global order (epochs back to back)."""
        epochs, within = np.divmod(positions, self.blocks)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = Permutation(self.blocks, self.seed, epoch)(within[mask])
        return out


def open_store(
    path: str | os.PathLike,
    tokenizer: TextTokenizer | None = None,
    tokenizer_name: str = "",
    vocab_size: int | None = None,
    on_error: str = "skip",
) -> TokenStore:
    """Open a store and check it against the run before the first step: the tokenizer
    (data.tokenizer=`tokenizer_name`), the model's `vocab_size`, and `on_error`
    (data.on_error=stop refuses a store whose prepare skipped bad records)."""
    store = TokenStore(path)
    if tokenizer is not None:
        store.check_tokenizer(tokenizer, tokenizer_name)
    if vocab_size is not None:
        store.check_vocab(vocab_size)
    if on_error == "stop":
        for name in store.splits:
            info = store.manifest["splits"][name]
            if info["skipped_records"]:
                first = info["data_errors"][0] if info["data_errors"] else {}
                raise DataError(
                    f"data.on_error=stop, but the token store {store.root} skipped "
                    f"{info['skipped_records']} bad records in its {name!r} split when it was "
                    f"prepared (first: {first.get('file')} at byte {first.get('offset')}: "
                    f"{first.get('reason')}); fix the corpus and prepare again, or set "
                    "data.on_error=skip")
    return store


def store_train_batches(
    store: TokenStore,
    seq_len: int,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    vocab_size: int | None = None,
) -> StoreBatches:
    """Training batches from the store's train split (config: training.seq_len,
    training.batch_size, training.seed, data.shuffle)."""
    return StoreBatches(store.split("train"), seq_len, global_batch, rank, world_size, seed,
                        shuffle, vocab_size=vocab_size)


def store_eval_batches(
    store: TokenStore,
    seq_len: int,
    global_batch: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "validation",
    vocab_size: int | None = None,
) -> EvalBatches:
    """This rank's rows of the first `num_batches` unshuffled global batches of `split`:
    the same batches `eval_batches` gives on the corpus the store was prepared from."""
    data = store.split(split)
    blocks = data.tokens // (seq_len + 1)
    if blocks < global_batch:
        raise DataError(
            f"token store {store.root}: the {split!r} split has {data.tokens} tokens, fewer "
            f"than {global_batch * (seq_len + 1)}, not enough for one evaluation batch")
    batches = StoreBatches(data, seq_len, global_batch, rank, world_size, shuffle=False,
                           repeat=False, vocab_size=vocab_size)
    return EvalBatches(list(islice(batches, num_batches)),
                       skipped_records=data.skipped_records, data_errors=data.data_errors)
