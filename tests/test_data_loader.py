"""Packed batches: packing, rank slices, resumable shuffling, epochs, evaluation batches."""

import gzip
import io
import json
import random
from pathlib import Path

import pytest
import torch

from lotus_dist.data import (
    DataWarning,
    LocalDocuments,
    PackedBatches,
    TextTokenizer,
    build_train_batches,
    eval_batches,
    train_tokenizer,
)

SEQ_LEN = 15  # blocks of 16 tokens
BLOCK = SEQ_LEN + 1
CHUNK = 32  # blocks per shuffle chunk
WORDS = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on", "by",
    "gradient", "subspace", "rank", "projection", "optimizer", "switch", "basis", "refresh",
]


def _documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lengths = [1, 3, 10, 40, 120]  # shorter and longer than a block
    return [" ".join(rng.choices(WORDS, k=rng.choice(lengths))) for _ in range(n)]


def _write_shard(path: Path, texts: list[str]) -> None:
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts)
    path.write_bytes(gzip.compress(lines.encode()))


TRAIN = _documents(300, seed=0)
VALIDATION = _documents(40, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    _write_shard(folder / "c4-train.00000-of-00002.json.gz", TRAIN[:150])
    _write_shard(folder / "c4-train.00001-of-00002.json.gz", TRAIN[150:])
    _write_shard(folder / "c4-validation.00000-of-00001.json.gz", VALIDATION)
    return folder


@pytest.fixture(scope="module")
def tokenizer(corpus: Path) -> TextTokenizer:
    return train_tokenizer(TRAIN, vocab_size=512, out_path=corpus.parent / "tokenizer.json")


def _stream(texts: list[str], tokenizer: TextTokenizer) -> list[int]:
    """What packing must reproduce: every document's tokens followed by EOS."""
    return [t for ids in tokenizer.encode_batch(texts) for t in [*ids, tokenizer.eos_id]]


@pytest.fixture(scope="module")
def epoch_batches(tokenizer: TextTokenizer) -> int:
    """Global batches of 8 blocks in one pass over the train split."""
    return len(_stream(TRAIN, tokenizer)) // (8 * BLOCK)


def _batches(corpus, tokenizer, rank=0, world_size=1, global_batch=8, **kwargs) -> PackedBatches:
    kwargs = {"seed": 7, "shuffle_chunk": CHUNK, **kwargs}
    source = LocalDocuments(corpus, "train")
    return PackedBatches(source, tokenizer, SEQ_LEN, global_batch, rank, world_size, **kwargs)


def _take(batches: PackedBatches, n: int) -> list[torch.Tensor]:
    return [next(batches) for _ in range(n)]


def _rows(batch: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row) for row in batch.tolist()]


def test_blocks_are_cut_from_the_eos_separated_token_stream(corpus, tokenizer) -> None:
    batches = _take(_batches(corpus, tokenizer, shuffle=False), 20)
    assert all(b.dtype == torch.long and b.shape == (8, BLOCK) for b in batches)
    packed = torch.cat(batches).flatten().tolist()
    assert packed == _stream(TRAIN, tokenizer)[: len(packed)]


def test_a_new_epoch_starts_where_the_source_runs_out(corpus, tokenizer, epoch_batches) -> None:
    batches = _batches(corpus, tokenizer, shuffle=False)
    packed = torch.cat(_take(batches, int(2.5 * epoch_batches))).flatten().tolist()
    assert packed == (_stream(TRAIN, tokenizer) * 3)[: len(packed)]
    assert batches.state_dict()["epoch"] == 2


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_take_disjoint_slices_that_rebuild_the_global_batch(
    corpus, tokenizer, world_size
) -> None:
    reference = _take(_batches(corpus, tokenizer), 6)
    per_rank = [
        _take(_batches(corpus, tokenizer, rank, world_size), 6) for rank in range(world_size)
    ]
    assert all(b.shape == (8 // world_size, BLOCK) for rank in per_rank for b in rank)
    for step, global_batch in enumerate(reference):
        assert torch.equal(torch.cat([rank[step] for rank in per_rank]), global_batch)
    every_row = [row for rank in per_rank for batch in rank for row in _rows(batch)]
    assert len(set(every_row)) == len(every_row) == 6 * 8


def test_global_batch_must_divide_by_the_world_size(corpus, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"training\.batch_size=6 .*world size 4"):
        _batches(corpus, tokenizer, rank=0, world_size=4, global_batch=6)


def test_shuffling_permutes_blocks_within_each_chunk(corpus, tokenizer) -> None:
    shuffled = _take(_batches(corpus, tokenizer, global_batch=CHUNK), 3)
    unshuffled = _take(_batches(corpus, tokenizer, global_batch=CHUNK, shuffle=False), 3)
    for mixed, ordered in zip(shuffled, unshuffled, strict=True):
        assert sorted(_rows(mixed)) == sorted(_rows(ordered))
        assert not torch.equal(mixed, ordered)


def test_shuffled_order_is_a_function_of_the_seed(corpus, tokenizer) -> None:
    first = torch.cat(_take(_batches(corpus, tokenizer, seed=1), 8))
    assert torch.equal(first, torch.cat(_take(_batches(corpus, tokenizer, seed=1), 8)))
    assert not torch.equal(first, torch.cat(_take(_batches(corpus, tokenizer, seed=2), 8)))


def _resume(corpus, tokenizer, consumed, n, save_world=1, load_world=1, **kwargs):
    """Global batches consumed+1 .. consumed+n, from a state saved after `consumed`."""
    states = []
    for rank in range(save_world):
        batches = _batches(corpus, tokenizer, rank, save_world, **kwargs)
        _take(batches, consumed)
        states.append(batches.state_dict())
    assert all(state == states[0] for state in states), "the state must not depend on the rank"
    state = json.loads(json.dumps(states[0]))  # as a checkpoint would store it
    per_rank = []
    for rank in range(load_world):
        batches = _batches(corpus, tokenizer, rank, load_world, **kwargs)
        batches.load_state_dict(state)
        per_rank.append(_take(batches, n))
    return [torch.cat(slices) for slices in zip(*per_rank, strict=True)]


def _assert_same(batches: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(batches) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(batches, reference, strict=True))


@pytest.mark.parametrize(
    ("consumed", "global_batch", "shuffle"),
    [
        pytest.param(0, 8, True, id="before-the-first-batch"),
        pytest.param(3, 8, False, id="mid-chunk-unshuffled"),
        pytest.param(3, 8, True, id="mid-chunk"),
        pytest.param(4, 8, True, id="at-a-chunk-end"),
        pytest.param(5, 6, True, id="before-a-batch-spanning-two-chunks"),
        pytest.param(6, 6, True, id="after-a-batch-spanning-two-chunks"),
    ],
)
def test_resume_continues_with_the_uninterrupted_batches(
    corpus, tokenizer, consumed, global_batch, shuffle
) -> None:
    kwargs = {"global_batch": global_batch, "shuffle": shuffle}
    reference = _take(_batches(corpus, tokenizer, **kwargs), consumed + 6)
    _assert_same(_resume(corpus, tokenizer, consumed, 6, **kwargs), reference[consumed:])


@pytest.mark.parametrize("past_epoch_end", [-1, 2])
def test_resume_across_an_epoch_boundary(corpus, tokenizer, epoch_batches, past_epoch_end) -> None:
    consumed = epoch_batches + past_epoch_end
    reference = _take(_batches(corpus, tokenizer), consumed + 4)
    _assert_same(_resume(corpus, tokenizer, consumed, 4), reference[consumed:])


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 4), (4, 2), (2, 1)])
def test_resume_on_a_different_world_size(corpus, tokenizer, save_world, load_world) -> None:
    reference = _take(_batches(corpus, tokenizer), 11)
    resumed = _resume(corpus, tokenizer, 5, 6, save_world=save_world, load_world=load_world)
    _assert_same(resumed, reference[5:])


class _CountingTokenizer(TextTokenizer):
    documents = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.documents += len(texts)
        return super().encode_batch(texts)


def test_resume_does_not_retokenize_the_stream(corpus, tokenizer, epoch_batches) -> None:
    counting, resumed_counting = (_CountingTokenizer(tokenizer.tokenizer) for _ in range(2))
    batches = _batches(corpus, counting)
    _take(batches, epoch_batches - 3)
    resumed = _batches(corpus, resumed_counting)
    resumed.load_state_dict(batches.state_dict())
    assert torch.equal(next(resumed), next(batches))
    assert resumed_counting.documents < counting.documents / 3


def test_state_dict_is_plain_data(corpus, tokenizer) -> None:
    batches = _batches(corpus, tokenizer)
    _take(batches, 3)
    state = batches.state_dict()
    assert set(state) == {
        "chunk", "offset", "epoch", "source", "carry", "skipped_records",
        "seq_len", "shuffle_chunk", "seed", "shuffle",
    }
    assert json.loads(json.dumps(state)) == state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state


def test_state_from_another_block_layout_is_refused(corpus, tokenizer) -> None:
    state = _batches(corpus, tokenizer).state_dict()
    other = PackedBatches(LocalDocuments(corpus, "train"), tokenizer, 31, 8, shuffle_chunk=CHUNK)
    with pytest.raises(ValueError, match=r"seq_len=15 \(now 31\)"):
        other.load_state_dict(state)


def test_skipped_records_are_visible_to_the_trainer(tmp_path, tokenizer) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n{oops\n')
    batches = PackedBatches(LocalDocuments(tmp_path, "train"), tokenizer, SEQ_LEN, 1)
    with pytest.warns(DataWarning, match=r"train\.jsonl: line 2, at byte 18"):
        next(batches)
    assert batches.skipped_records >= 1
    assert batches.data_errors[0]["offset"] == 18


@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_batches_are_the_first_unshuffled_validation_blocks(
    corpus, tokenizer, world_size
) -> None:
    per_rank = [
        eval_batches(corpus, tokenizer, SEQ_LEN, 4, num_batches=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    packed = torch.cat([torch.cat(rows) for rows in zip(*per_rank, strict=True)]).flatten()
    assert packed.tolist() == _stream(VALIDATION, tokenizer)[: 3 * 4 * BLOCK]


def test_eval_batches_stop_at_the_end_of_the_split(corpus, tokenizer) -> None:
    batches = eval_batches(corpus, tokenizer, SEQ_LEN, 4, num_batches=10**6)
    assert len(batches) == len(_stream(VALIDATION, tokenizer)) // (4 * BLOCK)
    assert all(batch.shape == (4, BLOCK) for batch in batches)
    with pytest.raises(ValueError, match=r"data\.path=.*one evaluation batch"):
        eval_batches(corpus, tokenizer, SEQ_LEN, 10**5, num_batches=1)


def test_build_train_batches_takes_config_values(corpus, tokenizer) -> None:
    built = build_train_batches(
        str(corpus), str(corpus.parent / "tokenizer.json"), SEQ_LEN, 8, seed=7,
        shuffle_chunk=CHUNK,
    )
    _assert_same(_take(built, 3), _take(_batches(corpus, tokenizer), 3))
