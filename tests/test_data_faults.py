"""Damaged corpora: truncated and non-gzip shards, malformed lines, data.on_error, and
resumes that report a damaged file as a data error, never as a bad checkpoint."""

import gzip
import json
import random
import re
from itertools import islice
from pathlib import Path

import pytest
import torch

from launcher.config import load_config
from launcher.data import build_data
from launcher.distributed import DistInfo
from launcher.train_state import JsonState
from lotus_dist.data import (
    DataError,
    DataWarning,
    LocalDocuments,
    PackedBatches,
    TextTokenizer,
    eval_batches,
    train_tokenizer,
)

SEQ_LEN = 15
TOTAL = 300  # batches: past the end of the damaged corpus's first epoch
WORDS = ["gradient", "subspace", "rank", "projection", "basis", "refresh", "the", "of", "a"]


def _texts(prefix: str, n: int, seed: int) -> list[str]:
    """Documents that compress poorly, so cutting a shard in half loses some of them."""
    rng = random.Random(seed)
    return [f"{prefix}{i} " + " ".join(rng.choices(WORDS, k=30)) + f" {rng.random()}"
            for i in range(n)]


def _json_lines(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def _truncate(path: Path, keep: int | None = None) -> int:
    """Cut a file to `keep` bytes (half by default), as an interrupted download leaves it;
    the new size."""
    data = path.read_bytes()
    keep = len(data) // 2 if keep is None else keep
    path.write_bytes(data[:keep])
    return keep


A, B, C = _texts("a", 40, 0), _texts("b", 200, 1), _texts("c", 40, 2)
VALIDATION = _texts("v", 60, 3)


def _corpus(folder: Path) -> Path:
    """Three train shards (the middle one is the one the tests damage) and validation."""
    folder.mkdir()
    _write(folder / "c4-train.00000-of-00003.json.gz", _json_lines(A))
    _write(folder / "c4-train.00001-of-00003.json.gz", _json_lines(B))
    _write(folder / "c4-train.00002-of-00003.json.gz", _json_lines(C))
    _write(folder / "c4-validation.00000-of-00001.json.gz", _json_lines(VALIDATION))
    return folder


MIDDLE = "c4-train.00001-of-00003.json.gz"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return _corpus(tmp_path / "c4")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(A + B + C + VALIDATION, vocab_size=300, out_path=out)


# ----------------------------------------------------------------- unreadable files


def test_truncated_gzip_stops_with_the_file_and_byte_offset(corpus: Path) -> None:
    size = _truncate(corpus / MIDDLE)
    source = LocalDocuments(corpus, "train", on_error="stop")
    with pytest.raises(DataError) as caught:
        list(source)
    message = str(caught.value)
    assert type(caught.value) is DataError
    assert str(corpus / MIDDLE) in message
    assert f"at byte {size} ({size} bytes)" in message  # it ran out at the end of the data
    assert "data.on_error=skip" in message and "replace it" in message


def test_non_gzip_file_stops_with_the_file_and_byte_offset(corpus: Path) -> None:
    (corpus / MIDDLE).write_bytes(_json_lines(B[:3]))  # JSON lines, never gzipped
    source = LocalDocuments(corpus, "train", on_error="stop")
    with pytest.raises(DataError, match=re.escape(str(corpus / MIDDLE))) as caught:
        list(source)
    assert re.search(r"cannot be read at byte \d+ .*BadGzipFile.*not gzip", str(caught.value))


def test_skip_keeps_the_good_documents_and_reports_the_unreadable_part(corpus: Path) -> None:
    size = _truncate(corpus / MIDDLE)
    source = LocalDocuments(corpus, "train")  # on_error="skip" is the default
    with pytest.warns(DataWarning, match=re.escape(str(corpus / MIDDLE))) as warned:
        documents = list(source)
    assert len(warned) == 1
    survived = documents[len(A) : len(documents) - len(C)]
    assert documents[: len(A)] == A and documents[len(documents) - len(C) :] == C
    assert 0 < len(survived) < len(B) and survived == B[: len(survived)]
    assert source.skipped == 1
    [event] = source.errors
    assert event["file"] == str(corpus / MIDDLE) and event["offset"] == size
    assert "truncated or not gzip" in event["reason"] and f"byte {size}" in event["reason"]


def test_skip_passes_over_a_non_gzip_file(corpus: Path) -> None:
    (corpus / MIDDLE).write_bytes(_json_lines(B[:3]))
    source = LocalDocuments(corpus, "train", on_error="skip")
    with pytest.warns(DataWarning, match="BadGzipFile"):
        assert list(source) == A + C
    assert source.skipped == 1 and source.errors[0]["file"] == str(corpus / MIDDLE)


# ----------------------------------------------------------------- malformed records


def _malformed_corpus(folder: Path) -> tuple[Path, list[int]]:
    """A plain JSON-lines shard with three bad lines; their byte offsets."""
    lines = [json.dumps({"text": "good 0"}), "{not json", json.dumps({"text": "good 1"}),
             json.dumps({"url": "no text"}), json.dumps({"text": 7}),
             json.dumps({"text": "good 2"})]
    path = _write(folder / "train.jsonl", "".join(line + "\n" for line in lines).encode())
    starts = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]
    return path, [starts[1], starts[3], starts[4]]


def test_malformed_lines_are_counted_and_each_named_with_file_line_and_offset(
    tmp_path: Path,
) -> None:
    path, offsets = _malformed_corpus(tmp_path)
    source = LocalDocuments(tmp_path, "train")
    with pytest.warns(DataWarning, match=rf"train\.jsonl: line 2, at byte {offsets[0]}: not JSON"
                      ) as warned:
        assert list(source) == ["good 0", "good 1", "good 2"]
    assert len(warned) == 1  # once per file, not once per record
    assert source.skipped == 3
    assert [event["offset"] for event in source.errors] == offsets
    assert all(event["file"] == str(path) for event in source.errors)
    reasons = [event["reason"] for event in source.errors]
    assert reasons[0].startswith(f"line 2, at byte {offsets[0]}: not JSON (Expecting")
    assert reasons[1] == f'line 4, at byte {offsets[1]}: no "text" field'
    assert reasons[2] == f'line 5, at byte {offsets[2]}: "text" is int, not a string'


def test_malformed_line_stops_with_file_line_and_offset(tmp_path: Path) -> None:
    path, offsets = _malformed_corpus(tmp_path)
    documents = iter(LocalDocuments(tmp_path, "train", on_error="stop"))
    assert next(documents) == "good 0"
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 2, at byte {offsets[0]} .*"
                                        r"not JSON.*data\.on_error=skip"):
        next(documents)


def test_malformed_line_in_a_gzipped_shard_names_the_decompressed_offset(corpus: Path) -> None:
    _write(corpus / MIDDLE, _json_lines(B[:2]) + b"\x00\xff garbage\n")
    offset = len(_json_lines(B[:2]))
    with pytest.raises(DataError, match=rf"line 3, at byte {offset} of the decompressed data"):
        list(LocalDocuments(corpus, "train", on_error="stop"))


def test_on_error_must_be_skip_or_stop(corpus: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.on_error='ignore'"):
        LocalDocuments(corpus, "train", on_error="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------- the loader and resume


def _batches(corpus: Path, tokenizer: TextTokenizer, on_error: str = "skip") -> PackedBatches:
    source = LocalDocuments(corpus, "train", on_error=on_error)  # type: ignore[arg-type]
    return PackedBatches(source, tokenizer, SEQ_LEN, 4, seed=3, shuffle_chunk=8)


def _take(batches: PackedBatches, n: int) -> list[torch.Tensor]:
    return [next(batches) for _ in range(n)]


@pytest.mark.filterwarnings("ignore::lotus_dist.data.DataWarning")
def test_the_loader_reports_skips_and_the_count_survives_a_resume(
    corpus: Path, tokenizer: TextTokenizer
) -> None:
    _truncate(corpus / MIDDLE)
    (corpus / "c4-train.00000-of-00003.json.gz").write_bytes(
        gzip.compress(_json_lines(A[:20]) + b"{broken\n" + _json_lines(A[20:])))
    reference = _batches(corpus, tokenizer)
    assert reference.skipped_records == 0
    expected, counts = [], []
    for batch in islice(reference, TOTAL):
        expected.append(batch)
        counts.append(reference.skipped_records)
    assert counts[-1] >= 3 and counts == sorted(counts)  # the next epoch counts them again
    events = reference.new_data_errors()
    assert [Path(event["file"]).name for event in events[:2]] == [
        "c4-train.00000-of-00003.json.gz", MIDDLE]
    assert reference.new_data_errors() == []  # each event is handed out once
    assert reference.data_errors[-len(events):] == events

    for consumed in (10, 100, 180, 250):
        interrupted = _batches(corpus, tokenizer)
        _take(interrupted, consumed)
        state = json.loads(json.dumps(interrupted.state_dict()))
        assert state["skipped_records"] <= interrupted.skipped_records
        resumed = _batches(corpus, tokenizer)
        resumed.load_state_dict(state)
        assert resumed.skipped_records == state["skipped_records"]
        assert resumed.state_dict() == state  # loaded, not yet read: the same state
        for step in range(consumed, TOTAL):
            assert torch.equal(next(resumed), expected[step])
            assert resumed.skipped_records == counts[step]


def _saved_file(batches: PackedBatches) -> int:
    """Index of the file the saved position points into."""
    return (batches.state_dict()["source"] or [0])[0]


def test_a_state_saved_before_skipped_records_existed_still_loads(
    corpus: Path, tokenizer: TextTokenizer
) -> None:
    batches = _batches(corpus, tokenizer)
    _take(batches, 5)
    state = batches.state_dict()
    del state["skipped_records"]
    resumed = _batches(corpus, tokenizer)
    resumed.load_state_dict(state)
    assert resumed.skipped_records == 0
    assert torch.equal(next(resumed), next(batches))


def test_resuming_onto_a_truncated_file_fails_at_the_first_batch_not_in_the_load(
    corpus: Path, tokenizer: TextTokenizer
) -> None:
    batches = _batches(corpus, tokenizer, on_error="stop")
    while _saved_file(batches) < 1:  # until the saved position is in MIDDLE
        next(batches)
    _take(batches, 2)
    saved = JsonState(batches).state_dict()  # as the checkpoint stores it
    _truncate(corpus / MIDDLE, keep=40)  # no whole record left before the saved position
    resumed = _batches(corpus, tokenizer, on_error="stop")
    JsonState(resumed).load_state_dict(saved)  # the checkpoint load: no data is read here
    with pytest.raises(DataError, match=re.escape(str(corpus / MIDDLE))) as caught:
        next(resumed)
    assert type(caught.value) is DataError and "checkpoint" not in str(caught.value)


def test_resuming_onto_a_corpus_with_fewer_files_fails_at_the_first_batch(
    corpus: Path, tokenizer: TextTokenizer
) -> None:
    batches = _batches(corpus, tokenizer)
    while _saved_file(batches) < 2:
        next(batches)
    state = batches.state_dict()
    (corpus / "c4-train.00002-of-00003.json.gz").unlink()
    (corpus / MIDDLE).unlink()
    resumed = _batches(corpus, tokenizer)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match=r"does not fit the 1 files .*did the corpus change"):
        next(resumed)


# ----------------------------------------------------------------- eval and the launcher


def test_eval_batches_tell_what_they_skipped(corpus: Path, tokenizer: TextTokenizer) -> None:
    path = corpus / "c4-validation.00000-of-00001.json.gz"
    path.write_bytes(gzip.compress(b"{bad\n" + _json_lines(VALIDATION)))
    with pytest.warns(DataWarning, match=r"line 1, at byte 0 of the decompressed data"):
        evals = eval_batches(corpus, tokenizer, SEQ_LEN, 4, num_batches=2)
    assert len(evals) == 2 and evals.skipped_records == 1
    assert evals.data_errors[0]["file"] == str(path)
    with pytest.raises(DataError, match=re.escape(str(path))):
        eval_batches(corpus, tokenizer, SEQ_LEN, 4, num_batches=2, on_error="stop")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_build_data_passes_data_on_error_to_both_splits(
    corpus: Path, tokenizer: TextTokenizer, tmp_path: Path, split: str
) -> None:
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer.tokenizer.save(str(tokenizer_path))
    damaged = corpus / (MIDDLE if split == "train" else "c4-validation.00000-of-00001.json.gz")
    damaged.write_bytes(b"not gzip at all")
    overrides = [f"data.path={corpus}", f"data.tokenizer={tokenizer_path}", "eval.batches=1",
                 f"training.seq_len={SEQ_LEN}", "training.batch_size=2",
                 "training.micro_batch_size=2"]
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    stop = load_config(None, [*overrides, "data.on_error=stop"])
    with pytest.raises(DataError, match=re.escape(str(damaged))):
        train, _, _ = build_data(stop, cpu)
        while True:
            next(train)
    skip = load_config(None, [*overrides, "data.on_error=skip"])
    if split == "validation":  # nothing left of the split: an error naming the key
        with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no documents \(1 "):
            build_data(skip, cpu)
        return
    train, evals, _ = build_data(skip, cpu)
    with pytest.warns(DataWarning, match=re.escape(str(damaged))):
        while train.source.position()[0] < 2:
            next(train)
    assert train.data_errors[0]["file"] == str(damaged) and evals.skipped_records == 0
