"""Build the sample corpus and its tokenizer on first use, once, whatever the number of ranks."""

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lotus_dist.data.sample import sample_corpus_complete, write_sample_corpus
from lotus_dist.data.sources import LocalDocuments
from lotus_dist.data.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing); others block until released."""
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_sample_assets(
    data_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None,
    vocab_size: int = 4096,
    max_bytes: int | None = None,
) -> tuple[Path, Path | None]:
    """Make sure the sample corpus and a tokenizer trained on its train split exist
    (only the corpus when ``tokenizer_path`` is None).

    Safe when every rank calls it at once: the first to take the lock builds, the others
    wait and then find everything in place. Both writes are atomic, so a build that was
    interrupted is simply done again. `max_bytes` caps the corpus size (see
    `write_sample_corpus`). Returns (data_dir, tokenizer_path).
    """
    data_dir = Path(data_dir)
    tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
    tokenizer_ready = tokenizer_path is None or tokenizer_path.is_file()
    if not (sample_corpus_complete(data_dir) and tokenizer_ready):
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        # The lock sits beside data_dir: the corpus folder appears by an atomic rename.
        with _exclusive_lock(data_dir.parent / f".{data_dir.name}.lock"):
            if not sample_corpus_complete(data_dir):
                logger.info("writing the sample corpus to %s", data_dir)
                write_sample_corpus(data_dir, max_bytes=max_bytes)
            if tokenizer_path is not None and not tokenizer_path.is_file():
                logger.info("training a %d-token BPE tokenizer at %s", vocab_size, tokenizer_path)
                train_tokenizer(LocalDocuments(data_dir, "train"), vocab_size, tokenizer_path)
    return data_dir, tokenizer_path
