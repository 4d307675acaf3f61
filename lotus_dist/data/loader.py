"""Packed, shuffled, rank-sharded training batches that resume exactly, on any world size.

The token stream is cut into blocks of seq_len + 1 tokens. Blocks are read in chunks of
`shuffle_chunk` blocks and each chunk is permuted by a generator seeded from
(seed, chunk index), so the order of blocks is a pure function of the data and the seed.
Global batch i is blocks [i*B, (i+1)*B) of that order, and rank r of W takes rows
[r*B/W, (r+1)*B/W) of it: every rank tokenizes the whole stream but keeps only its rows,
which is what makes the batches independent of the world size.

Loading a state only stores it: the files are read when the next batch is asked for,
so a damaged corpus shows up there as a DataError naming the file, never as a failure
to load the checkpoint that holds the state.
"""

import hashlib
import os
from itertools import islice
from typing import Any

import torch

from lotus_dist.data.sources import DataError, DocumentSource, OnError, open_documents
from lotus_dist.data.token_stream import TokenStream
from lotus_dist.data.tokenizer import TextTokenizer, load_tokenizer

DEFAULT_SHUFFLE_CHUNK = 1024
# The token stream's part of a loader state.
_STREAM_KEYS = ("epoch", "source", "carry", "skipped_records")


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """A generator for one chunk's permutation, independent of every other chunk's."""
    digest = hashlib.blake2b(f"{seed}/{chunk}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def check_batch_layout(seq_len: int, global_batch: int, rank: int, world_size: int) -> None:
    """The checks every batch source shares: rank r of W takes an equal slice of each
    global batch of ``global_batch`` sequences of ``seq_len`` tokens."""
    if seq_len < 1:
        raise ValueError(f"training.seq_len={seq_len} must be positive")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(
            f"training.batch_size={global_batch} must be a positive multiple of the "
            f"world size {world_size}: each rank takes an equal slice of every global batch"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world size {world_size}")


class PackedBatches:
    """This rank's rows of each global batch, as LongTensor[global_batch / world_size, seq_len + 1].

    Inputs are `x[:, :-1]` and targets `x[:, 1:]`. When the source runs out a new epoch
    starts (the token stream runs on across the boundary); with `repeat=False` the
    iterator stops instead, dropping the last partial batch.

    Bad data is the source's `on_error` to handle (skip and count, or DataError);
    `skipped_records` and `data_errors` show what was skipped.
    """

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: TextTokenizer,
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_chunk: int = DEFAULT_SHUFFLE_CHUNK,
        shuffle: bool = True,
        repeat: bool = True,
    ) -> None:
        check_batch_layout(seq_len, global_batch, rank, world_size)
        if shuffle_chunk < 1:
            raise ValueError(f"shuffle_chunk={shuffle_chunk} must be positive")
        self.source = source
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle_chunk = shuffle_chunk
        self.shuffle = shuffle
        self._stream = TokenStream(source, tokenizer, repeat)
        # A loaded state not yet applied (see load_state_dict).
        self._pending: dict[str, Any] | None = None
        self._errors_seen = 0  # source.errors_total at the last new_data_errors()
        self._start_at_chunk(0)

    @property
    def skipped_records(self) -> int:
        """Malformed records and unreadable file parts skipped over the whole run (resumes
        included), up to the data the loader has read into batches so far (at most one
        shuffle chunk ahead of the last batch). Saved in the state; the same at the
        same batch whether or not the run was resumed."""
        if self._pending is not None:
            return self._pending["skipped_records"]
        return self._stream.skipped_records

    @property
    def data_errors(self) -> list[dict[str, Any]]:
        """The latest skips (at most `MAX_ERRORS_KEPT`), oldest first, each
        {"file", "offset", "reason"}. Not saved: after a resume it holds the skips
        read since. Data read ahead or read again after a resume appears here too."""
        return list(self.source.errors)

    def new_data_errors(self) -> list[dict[str, Any]]:
        """The skips recorded since the last call (the latest `MAX_ERRORS_KEPT` of
        them): what a trainer logs at each log step without repeating itself."""
        total = self.source.errors_total
        new = min(total - self._errors_seen, len(self.source.errors))
        self._errors_seen = total
        return list(self.source.errors)[len(self.source.errors) - new :]

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self._pending is not None:
            self._restore(self._pending)
        parts = []
        needed = self.global_batch
        while needed:
            if self._offset == len(self._chunk):
                self._load_next_chunk()
                if len(self._chunk) == 0:  # only a non-repeating stream runs dry
                    raise StopIteration
            rows = self._chunk[self._offset : self._offset + needed]
            parts.append(rows)
            self._offset += len(rows)
            needed -= len(rows)
        first = self.rank * self.local_batch
        # clone: do not keep the other ranks' rows alive through a view
        return torch.cat(parts)[first : first + self.local_batch].clone()

    def state_dict(self) -> dict[str, Any]:
        """The global position (the same on every rank), as plain Python data.

        `chunk`: index of the chunk the next batch starts in; `offset`: blocks of it
        already used; `epoch`, `source`, `carry`: the token stream at that chunk's start
        (source position, and tokens of a partly used document); `skipped_records`:
        bad records skipped before that position. `seq_len`, `shuffle_chunk`, `seed`,
        `shuffle` are checked on load.
        """
        if self._pending is not None:  # loaded, not yet read: the loaded state
            return {**self._pending, **self._layout()}
        if self._offset < len(self._chunk):
            chunk, offset, start = self._chunk_index, self._offset, self._chunk_start
        else:  # the next batch opens a new chunk where the stream stands now
            chunk, offset, start = self._chunk_index + 1, 0, self._stream.state()
        return {"chunk": chunk, "offset": offset, **start, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after `state`, re-tokenizing at most the chunk it points into.

        Only checks the layout and stores the state: the corpus is read at the next
        batch, so a damaged file is reported there (DataError naming it) rather than
        while a checkpoint is being loaded, where it would look like a bad checkpoint.
        A state saved before `skipped_records` existed counts from 0.
        """
        if state.get("kind") == "token_store" or "chunk" not in state:
            raise ValueError(
                "the data-loader state was saved while training from a prepared token store "
                "(data.path was a store); it cannot continue on a streamed corpus. Set "
                "data.path back to that store to resume, or start a new run.dir"
            )
        changed = [
            f"{key}={state[key]} (now {value})"
            for key, value in self._layout().items()
            if state[key] != value
        ]
        if changed:
            raise ValueError(
                f"the data-loader state was saved with {', '.join(changed)}; resuming would "
                "not replay the same batches"
            )
        self._pending = {
            **{key: state[key] for key in ("chunk", "offset", "epoch", "source", "carry")},
            "skipped_records": int(state.get("skipped_records", 0)),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        """Apply a loaded state; this reads the corpus up to the saved position."""
        self._stream.restore({key: state[key] for key in _STREAM_KEYS})
        self._start_at_chunk(state["chunk"])
        if state["offset"]:
            self._load_next_chunk()
            self._offset = state["offset"]
        self._pending = None

    def _layout(self) -> dict[str, Any]:
        """The settings that decide which blocks form which batch."""
        return {
            "seq_len": self.seq_len,
            "shuffle_chunk": self.shuffle_chunk,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def _start_at_chunk(self, chunk: int) -> None:
        """Empty the current chunk, so that the next batch loads chunk `chunk`."""
        self._chunk_index = chunk - 1
        self._chunk = torch.empty(0, self.seq_len + 1, dtype=torch.long)
        self._chunk_start = self._stream.state()
        self._offset = 0

    def _load_next_chunk(self) -> None:
        block = self.seq_len + 1
        self._chunk_index += 1
        self._chunk_start = self._stream.state()
        tokens = self._stream.take(self.shuffle_chunk * block)
        n_blocks = len(tokens) // block  # short only at the end of a non-repeating stream
        chunk = torch.tensor(tokens[: n_blocks * block], dtype=torch.long).view(n_blocks, block)
        if self.shuffle:
            generator = _chunk_generator(self.seed, self._chunk_index)
            chunk = chunk[torch.randperm(n_blocks, generator=generator)]
        self._chunk = chunk
        self._offset = 0


def _as_tokenizer(tokenizer: TextTokenizer | str | os.PathLike) -> TextTokenizer:
    return tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)


class EvalBatches(list):
    """The evaluation batches (a list of tensors), with what reading them skipped:
    `skipped_records` (int) and `data_errors` (list of {"file", "offset", "reason"}).

    They come from the `source` that was read, or (for a prepared token store, whose
    skips were counted when it was prepared) from `skipped_records` and `data_errors`."""

    def __init__(
        self,
        batches: list[torch.Tensor],
        source: DocumentSource | None = None,
        *,
        skipped_records: int = 0,
        data_errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(batches)
        self.skipped_records: int = source.skipped if source is not None else skipped_records
        self.data_errors: list[dict[str, Any]] = (
            list(source.errors) if source is not None else list(data_errors or []))


def build_train_batches(
    path: str | os.PathLike,
    tokenizer: TextTokenizer | str | os.PathLike,
    seq_len: int,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_chunk: int = DEFAULT_SHUFFLE_CHUNK,
    on_error: OnError = "skip",
) -> PackedBatches:
    """Training batches from config values: `data.path`, `data.tokenizer`,
    `training.seq_len`, `training.batch_size` (global), `training.seed` and
    `data.on_error`.

    Each item is this rank's share of one optimizer step; split it into micro-batches
    for gradient accumulation.
    """
    return PackedBatches(
        open_documents(path, "train", on_error),
        _as_tokenizer(tokenizer),
        seq_len,
        global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_chunk=shuffle_chunk,
    )


def eval_batches(
    path: str | os.PathLike,
    tokenizer: TextTokenizer | str | os.PathLike,
    seq_len: int,
    global_batch: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "validation",
    on_error: OnError = "skip",
) -> EvalBatches:
    """This rank's rows of the first `num_batches` unshuffled global batches of `split`.

    Always the same batches, so evaluations are comparable across steps and runs;
    fewer than `num_batches` when the split is short (data is never repeated). The
    result is a list that also tells what reading it skipped (see EvalBatches).
    """
    source = open_documents(path, split, on_error)
    batches = PackedBatches(
        source,
        _as_tokenizer(tokenizer),
        seq_len,
        global_batch,
        rank=rank,
        world_size=world_size,
        shuffle_chunk=global_batch,
        shuffle=False,
        repeat=False,
    )
    result = list(islice(batches, num_batches))
    if not result:
        raise DataError(
            f"data.path={str(path)!r}: the {split!r} split has fewer than "
            f"{global_batch * (seq_len + 1)} tokens, not enough for one evaluation batch"
        )
    return EvalBatches(result, source)
