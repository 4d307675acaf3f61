"""Training from a prepared token store: world-size-independent order, exact resume,
prefetching, equality with the stream, clear errors, and an end-to-end run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from small_runs import metric_rows, small_run

from launcher.config import load_config
from launcher.data import build_data
from launcher.distributed import DistInfo
from launcher.train import run
from lotus_dist.data import (
    STORE_MANIFEST,
    DataError,
    LocalDocuments,
    PackedBatches,
    Prefetcher,
    StoreBatches,
    TokenStore,
    eval_batches,
    load_tokenizer,
    open_store,
    prepare_store,
    store_eval_batches,
    train_tokenizer,
)
from lotus_dist.data.permute import Permutation
from lotus_dist.data.store import PROGRESS_FILE

SEQ_LEN = 31  # blocks of 32 tokens
BATCH = 12  # divisible by 1, 2, 3 and 4
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def store(small_corpus, tmp_path_factory) -> Path:
    """The test corpus, 20k tokens per split, in shards of 1000 tokens (so blocks cross
    shard edges): about 52 global batches per epoch."""
    corpus, tokenizer = small_corpus
    out = tmp_path_factory.mktemp("store") / "store"
    prepare_store(str(corpus), str(tokenizer), out, max_tokens=20_000, workers=1,
                  shard_tokens=1000, progress=False)
    return out


def _train(store: Path, rank: int = 0, world: int = 1, **kwargs) -> StoreBatches:
    kwargs = {"seed": 5, **kwargs}
    return StoreBatches(TokenStore(store).split("train"), SEQ_LEN, BATCH, rank, world, **kwargs)


def _take(batches, n: int) -> list[torch.Tensor]:
    return [next(batches) for _ in range(n)]


def _global(store: Path, n: int, **kwargs) -> list[torch.Tensor]:
    return _take(_train(store, **kwargs), n)


def test_permutation_is_a_seeded_bijection_of_any_size():
    for n in (1, 2, 3, 7, 100, 1000, 4097):
        image = Permutation(n, seed=0, epoch=0)(np.arange(n))
        assert sorted(image.tolist()) == list(range(n))
    first = Permutation(1000, 0, 0)(np.arange(1000))
    assert not np.array_equal(first, Permutation(1000, 0, 1)(np.arange(1000)))  # epoch
    assert not np.array_equal(first, Permutation(1000, 1, 0)(np.arange(1000)))  # seed
    assert np.array_equal(first, Permutation(1000, 0, 0)(np.arange(1000)))  # pure
    assert np.array_equal(first[[5, 17]], Permutation(1000, 0, 0)(np.array([5, 17])))


def test_unshuffled_batches_are_the_blocks_in_file_order(store):
    split = TokenStore(store).split("train")
    tokens = split.read_tokens(0, split.tokens)
    blocks = torch.from_numpy(tokens[: len(tokens) // 32 * 32].astype(np.int64)).view(-1, 32)
    batches = _global(store, len(blocks) // BATCH + 3, shuffle=False)
    epoch = torch.cat(batches)[: len(blocks)]
    assert torch.equal(epoch, blocks)
    # the next epoch starts again at block 0, in the middle of a batch
    assert torch.equal(torch.cat(batches)[len(blocks): len(blocks) + 5], blocks[:5])


def test_few_open_shard_maps_read_the_same_batches(store):
    reference = _global(store, 60)
    split = TokenStore(store).split("train")
    split._capacity = 2  # as with far more shards than file descriptors: an LRU of maps
    loader = StoreBatches(split, SEQ_LEN, BATCH, seed=5)
    assert all(torch.equal(next(loader), batch) for batch in reference)
    assert len(split._maps) == 2


def test_every_epoch_is_a_fresh_permutation_of_all_blocks(store):
    loader = _train(store)
    n = loader.blocks
    rows = torch.cat(_take(loader, 2 * n // BATCH + 1))
    first, second = rows[:n], rows[n: 2 * n]
    assert not torch.equal(first, second)
    as_set = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert as_set(first) == as_set(second)  # the same blocks, in another order


@pytest.mark.parametrize("world", [2, 3, 4])
def test_order_is_the_same_for_every_world_size(store, world):
    n = 2 * _train(store).blocks // BATCH  # two epochs
    reference = _global(store, n)
    ranks = [_train(store, r, world) for r in range(world)]
    for i in range(n):
        rows = [next(rank) for rank in ranks]
        assert all(r.shape == (BATCH // world, SEQ_LEN + 1) for r in rows)
        assert torch.equal(torch.cat(rows), reference[i]), f"batch {i} differs at W={world}"


@pytest.mark.parametrize(("stop_at", "world_after"), [(10, 1), (10, 3), (55, 2), (104, 4)])
def test_resume_equals_no_interruption_on_any_world_size(store, stop_at, world_after):
    """Mid-epoch (10), just after the first epoch boundary (52 batches per epoch: 55),
    at the second (104); the state goes through JSON as in a checkpoint."""
    total = stop_at + 30
    reference = _global(store, total)
    first = _train(store, 0, 2)
    _take(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batch"] == stop_at and state["epoch"] == stop_at * BATCH // first.blocks
    ranks = [_train(store, r, world_after) for r in range(world_after)]
    for rank in ranks:
        rank.load_state_dict(state)
    for i in range(stop_at, total):
        assert torch.equal(torch.cat([next(rank) for rank in ranks]), reference[i])


def test_a_state_from_another_layout_or_loader_is_refused(store, small_corpus):
    loader = _train(store)
    _take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed=5"):
        _train(store, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle=True"):
        _train(store, shuffle=False).load_state_dict(state)
    corpus, tokenizer = small_corpus
    stream = PackedBatches(LocalDocuments(corpus, "train"), load_tokenizer(tokenizer), SEQ_LEN,
                           BATCH)
    with pytest.raises(ValueError, match="streaming loader"):
        loader.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="prepared token store"):
        stream.load_state_dict(state)


def test_another_batch_size_continues_from_the_same_position(store):
    reference = torch.cat(_global(store, 20))
    loader = _train(store)
    _take(loader, 5)
    wider = StoreBatches(TokenStore(store).split("train"), SEQ_LEN, 2 * BATCH, seed=5)
    wider.load_state_dict(loader.state_dict())
    assert torch.equal(torch.cat(_take(wider, 3)), reference[5 * BATCH: 11 * BATCH])


def test_store_batches_equal_stream_batches_on_the_same_tokens(store, small_corpus):
    """Unshuffled, within an epoch: the store cuts the same blocks as the stream."""
    corpus, tokenizer_path = small_corpus
    tokenizer = load_tokenizer(tokenizer_path)
    store_loader = _train(store, shuffle=False)
    stream = PackedBatches(LocalDocuments(corpus, "train"), tokenizer, SEQ_LEN, BATCH,
                           shuffle=False)
    for _ in range(store_loader.blocks // BATCH):
        assert torch.equal(next(store_loader), next(stream))
    opened = TokenStore(store)
    from_store = store_eval_batches(opened, SEQ_LEN, BATCH, 3, rank=1, world_size=2)
    from_stream = eval_batches(corpus, tokenizer, SEQ_LEN, BATCH, 3, rank=1, world_size=2)
    assert len(from_store) == len(from_stream) == 3
    assert all(torch.equal(a, b) for a, b in zip(from_store, from_stream))
    assert from_store.skipped_records == 0 and from_store.data_errors == []


@pytest.mark.parametrize("kind", ["store", "stream"])
def test_prefetcher_state_counts_batches_consumed_not_staged(store, small_corpus, kind):
    corpus, tokenizer_path = small_corpus
    tokenizer = load_tokenizer(tokenizer_path)

    def make():
        if kind == "store":
            return _train(store)
        return PackedBatches(LocalDocuments(corpus, "train"), tokenizer, SEQ_LEN, BATCH,
                             seed=5, shuffle_chunk=40)

    reference = _take(make(), 40)
    staged = Prefetcher(make(), depth=3)
    assert torch.equal(next(staged), reference[0])
    got = [reference[0], *_take(staged, 14)]
    state = json.loads(json.dumps(staged.state_dict()))
    plain = make()
    _take(plain, 15)
    assert state == json.loads(json.dumps(plain.state_dict()))
    resumed = Prefetcher(make(), depth=3)
    resumed.load_state_dict(state)
    got += _take(resumed, 10)
    # load_state_dict on a running prefetcher (a rollback) drops what it staged
    staged.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(staged, 10), reference[15:25]))
    assert all(torch.equal(a, b) for a, b in zip(got, reference[:25]))
    assert staged.skipped_records == 0 and staged.new_data_errors() == []
    staged.close()
    resumed.close()


class _Counting:
    """A minimal loader: batch i is a tensor filled with i; raises at `fail_at`."""

    skipped_records = 0

    def __init__(self, fail_at: int | None = None) -> None:
        self.i, self.fail_at = 0, fail_at
        self.data_errors: list = []

    def __next__(self) -> torch.Tensor:
        if self.i + 1 == self.fail_at:
            raise DataError("shard gone")
        self.i += 1
        return torch.full((2, 3), self.i)

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]

    def new_data_errors(self) -> list:
        return []


def test_prefetcher_raises_the_loaders_error_at_that_batch():
    staged = Prefetcher(_Counting(fail_at=3))
    assert [int(b[0, 0]) for b in _take(staged, 2)] == [1, 2]
    for _ in range(2):
        with pytest.raises(DataError, match="shard gone"):
            next(staged)
    assert staged.state_dict() == {"i": 2}
    staged.close()


@pytest.mark.cuda
def test_prefetcher_pins_batches_on_cuda():
    staged = Prefetcher(_Counting(), pin_memory=True)
    batch = next(staged)
    assert batch.is_pinned() and int(batch[0, 0]) == 1
    staged.close()


def _copy(store: Path, tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(store, target)
    return target


def test_missing_or_truncated_shards_are_clear_errors(store, tmp_path):
    damaged = _copy(store, tmp_path)
    shard = damaged / "train-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=re.escape(f"{shard} has 1998 bytes") + ".*truncated"):
        TokenStore(damaged).split("train")
    shard.unlink()
    with pytest.raises(DataError, match=re.escape(f"shard {shard} is missing")):
        TokenStore(damaged).split("train")


def test_a_corrupt_token_id_is_caught_at_its_batch(store, tmp_path):
    damaged = _copy(store, tmp_path)
    shard = damaged / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0:2] = (60000).to_bytes(2, "little")  # beyond the 512-id vocabulary
    shard.write_bytes(bytes(data))
    loader = StoreBatches(TokenStore(damaged).split("train"), SEQ_LEN, BATCH, shuffle=False,
                          vocab_size=512)
    with pytest.raises(DataError, match=r"token id 60000.*corrupt"):
        next(loader)
    TokenStore(damaged).split("train").check_files()  # the size is right: only a hash sees it
    with pytest.raises(DataError, match="sha256"):
        TokenStore(damaged).split("train").verify()


@pytest.fixture(scope="module")
def other_tokenizer(small_corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other") / "tokenizer.json"
    train_tokenizer(LocalDocuments(small_corpus[0], "validation"), 300, path)
    return path


def test_tokenizer_and_vocab_mismatches_are_clear_errors(store, small_corpus, other_tokenizer):
    _, tokenizer_path = small_corpus
    with pytest.raises(DataError, match=r"is not the tokenizer the token store .* prepared "
                                        r"with .*set data.tokenizer="):
        open_store(store, load_tokenizer(other_tokenizer), str(other_tokenizer))
    tokenizer = load_tokenizer(tokenizer_path)
    open_store(store, tokenizer, str(tokenizer_path), vocab_size=512)
    with pytest.raises(DataError, match="vocab_size=300 cannot embed"):
        open_store(store, tokenizer, str(tokenizer_path), vocab_size=300)
    # the store's own copy of the tokenizer is the same tokenizer
    open_store(store, load_tokenizer(store / "tokenizer.json"), "copy", vocab_size=512)


def test_small_stores_and_missing_splits_are_clear_errors(store, small_corpus, tmp_path):
    split = TokenStore(store).split("train")
    with pytest.raises(DataError, match=r"fewer than one global batch of training\.batch_size"):
        StoreBatches(split, SEQ_LEN, split.tokens // 32 + 1)
    corpus, tokenizer = small_corpus
    train_only = tmp_path / "train-only"
    prepare_store(str(corpus), str(tokenizer), train_only, splits=["train"], max_tokens=2000,
                  workers=1, progress=False)
    with pytest.raises(DataError, match="has no 'validation' split"):
        store_eval_batches(TokenStore(train_only), SEQ_LEN, BATCH, 2)
    with pytest.raises(DataError, match="not enough for one evaluation batch"):
        store_eval_batches(TokenStore(store), SEQ_LEN, 1000, 2)


def _config(store: Path, tokenizer: Path, run_dir: Path, *extra: str):
    return load_config("configs/tiny.yaml", small_run(store, tokenizer, run_dir, *extra))


def test_build_data_reads_a_store_and_checks_it_first(store, small_corpus, other_tokenizer,
                                                      tmp_path):
    corpus, tokenizer = small_corpus
    cfg = _config(store, tokenizer, tmp_path, "eval.batches=2")
    train, evals, vocab = build_data(cfg, CPU)
    assert isinstance(train, Prefetcher) and isinstance(train.loader, StoreBatches)
    assert next(train).shape == (8, 33) and vocab == 512 and len(evals) == 2
    assert train.skipped_records == 0
    stream_train, stream_evals, _ = build_data(
        _config(corpus, tokenizer, tmp_path, "eval.batches=2"), CPU)
    assert all(torch.equal(a, b) for a, b in zip(evals, stream_evals))
    assert isinstance(stream_train.loader, PackedBatches)
    train.close()
    stream_train.close()
    with pytest.raises(DataError, match="is not the tokenizer the token store"):
        build_data(_config(store, other_tokenizer, tmp_path), CPU)
    with pytest.raises(DataError, match=re.escape(f"set data.tokenizer={store}/tokenizer.json")):
        build_data(_config(store, tmp_path / "missing.json", tmp_path), CPU)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_data(_config(store, tokenizer, tmp_path, "training.batch_size=1024",
                           "training.micro_batch_size=1024"), CPU)
    unfinished = _copy(store, tmp_path)
    (unfinished / STORE_MANIFEST).rename(unfinished / PROGRESS_FILE)
    with pytest.raises(DataError, match="prepare was interrupted"):
        build_data(_config(unfinished, tokenizer, tmp_path), CPU)


def test_a_tiny_training_run_from_a_store_resumes_exactly(store, small_corpus, tmp_path):
    _, tokenizer = small_corpus
    extra = ("training.steps=6", "training.warmup_steps=2", "training.log_interval=1",
             "eval.interval=3", "eval.batches=1", "checkpoint.interval=3",
             "checkpoint.keep_latest=0")
    summary = run(_config(store, tokenizer, tmp_path, *extra))
    assert summary["steps"] == 6 and summary["skipped_records"] == 0
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    uninterrupted = metric_rows(tmp_path)
    shutil.rmtree(tmp_path / "ckpt" / "step-6")
    run(_config(store, tokenizer, tmp_path, *extra))  # resumes from step 3
    assert metric_rows(tmp_path) == uninterrupted
