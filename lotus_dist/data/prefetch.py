"""Stage the next batches on a background thread, exactly resumable.

`Prefetcher(loader)` runs `next(loader)` on a thread, up to `depth` batches ahead of
the training loop, and (on CUDA) pins each batch so that the trainer's
`.to(device, non_blocking=True)` overlaps the copy with compute. The streaming loader's
tokenization then runs off the training thread too (the tokenizer releases the GIL
while it encodes).

Exactness: with every batch the thread also takes the loader's state, skip count and
new data errors right after producing it, and the Prefetcher reports the values of the
last batch *handed out*: `state_dict()` resumes after the batches the trainer consumed,
never after those merely staged. `load_state_dict` stops the thread, drops what it
staged and loads the state into the loader; the thread starts again at the next batch.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from typing import Any

import torch

from lotus_dist.data.sources import MAX_ERRORS_KEPT

DEFAULT_DEPTH = 2
_POLL_S = 0.1


class _End:
    """The loader ran out (StopIteration)."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _produce(loader: Any, out: queue.Queue, stop: threading.Event, pin: bool) -> None:
    """The thread: batches with the loader's state after each, until stopped."""
    while not stop.is_set():
        try:
            batch = next(loader)
            if pin:
                batch = batch.pin_memory()
            item: Any = (batch, loader.state_dict(), loader.skipped_records,
                         loader.new_data_errors())
        except StopIteration:
            item = _End()
        except BaseException as err:  # handed to the consumer, raised there
            item = _Failure(err)
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if not isinstance(item, tuple):
            return


class Prefetcher:
    """A loader (PackedBatches, StoreBatches) with its next batches staged on a thread.

    Same protocol as the loader: iteration, `state_dict` / `load_state_dict`,
    `skipped_records`, `data_errors`, `new_data_errors()`; other attributes are the
    loader's. An error raised while producing a batch (a DataError) is raised by the
    `next()` that would have returned that batch, and again by later calls.
    """

    def __init__(self, loader: Any, depth: int = DEFAULT_DEPTH, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth={depth} must be at least 1")
        self.loader = loader
        self.depth = depth
        self.pin_memory = pin_memory
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._state: dict[str, Any] | None = None  # after the last batch handed out
        self._skipped = 0
        self._errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS_KEPT)
        self._new: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS_KEPT)
        self._failure: BaseException | None = None
        self._ended = False
        self._finalizer: weakref.finalize | None = None
        self._started = False

    # ----------------------------------------------------------- the loader's protocol

    @property
    def skipped_records(self) -> int:
        return self.loader.skipped_records if self._thread is None else self._skipped

    @property
    def data_errors(self) -> list[dict[str, Any]]:
        """The errors that came with the batches handed out (the loader's until the
        first batch)."""
        return list(self._errors) if self._started else self.loader.data_errors

    def new_data_errors(self) -> list[dict[str, Any]]:
        if self._thread is None:
            return self.loader.new_data_errors()
        new = list(self._new)
        self._new.clear()
        return new

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        if self._failure is not None:
            raise self._failure
        if self._ended:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, _End):
            self._ended = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._failure = item.error
            raise item.error
        batch, self._state, self._skipped, errors = item
        self._errors.extend(errors)
        self._new.extend(errors)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The loader's state after the last batch handed out (not the staged ones)."""
        if self._thread is None:
            return self.loader.state_dict()
        assert self._state is not None
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the thread and drop what it staged; the loader stands after the batches
        handed out, and the next `next()` starts staging again."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._state is not None:
                # The thread ran ahead: put the loader back where the consumer stands.
                self.loader.load_state_dict(self._state)
        self._thread = None
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._state = None
        self._failure = None
        self._ended = False
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the Prefetcher: the loader's (e.g. source).
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    # ----------------------------------------------------------- the thread

    def _start(self) -> None:
        if not self._started:
            self._errors.extend(self.loader.data_errors)
            self._started = True
        self._state = self.loader.state_dict()
        self._skipped = self.loader.skipped_records
        self._new.extend(self.loader.new_data_errors())
        self._thread = threading.Thread(
            target=_produce, args=(self.loader, self._queue, self._stop, self.pin_memory),
            name="lotus-data-prefetch", daemon=True)
        # The thread holds the loader, not the Prefetcher: dropping the Prefetcher stops it.
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()
