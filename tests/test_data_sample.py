"""The stdlib-docstring sample corpus and the first-use build of corpus and tokenizer."""

import gzip
import json
import multiprocessing
from pathlib import Path

import pytest

from lotus_dist.data import (
    LocalDocuments,
    assets,
    ensure_sample_assets,
    load_tokenizer,
    sample,
    sample_corpus_complete,
    write_sample_corpus,
)

SMALL = 100_000  # bytes of text: enough to test, quick to parse


def test_sample_corpus_has_c4_train_and_validation_shards(tmp_path: Path) -> None:
    manifest = write_sample_corpus(tmp_path / "sample", max_bytes=SMALL)
    names = sorted(path.name for path in (tmp_path / "sample").glob("c4-*"))
    assert names == [
        "c4-train.00000-of-00002.json.gz",
        "c4-train.00001-of-00002.json.gz",
        "c4-validation.00000-of-00001.json.gz",
    ]
    for split in ("train", "validation"):
        records = []
        for name in manifest["splits"][split]["files"]:
            with gzip.open(tmp_path / "sample" / name, "rt") as lines:
                records += [json.loads(line) for line in lines]
        assert len(records) == manifest["splits"][split]["documents"] > 0
        assert all(list(record) == ["text", "timestamp", "url"] for record in records)
        assert all(record["text"].strip() for record in records)
    assert sample_corpus_complete(tmp_path / "sample")
    assert list(LocalDocuments(tmp_path / "sample", "validation"))


def test_sample_corpus_is_deterministic(tmp_path: Path) -> None:
    write_sample_corpus(tmp_path / "a", max_bytes=SMALL)
    write_sample_corpus(tmp_path / "b", max_bytes=SMALL)
    files = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_interrupted_write_leaves_no_partial_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(documents):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "_shard_bytes", fail)
    with pytest.raises(KeyboardInterrupt):
        write_sample_corpus(tmp_path / "sample", max_bytes=SMALL)
    assert list(tmp_path.iterdir()) == []
    assert not sample_corpus_complete(tmp_path / "sample")


def test_sample_corpus_is_never_written_over_other_files(tmp_path: Path) -> None:
    (tmp_path / "c4-train.00000-of-00001.json.gz").write_bytes(b"someone's data")
    with pytest.raises(FileExistsError, match="not empty"):
        write_sample_corpus(tmp_path, max_bytes=SMALL)


def _count_calls(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Append a line to `log` per corpus or tokenizer build, from any process."""
    for name in ("write_sample_corpus", "train_tokenizer"):
        build = getattr(assets, name)

        def counted(*args, _build=build, _name=name, **kwargs):
            with open(log, "a") as file:
                file.write(_name + "\n")
            return _build(*args, **kwargs)

        monkeypatch.setattr(assets, name, counted)


def test_ensure_sample_assets_builds_once_then_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "builds.log"
    _count_calls(monkeypatch, log)
    data_dir, tokenizer_path = tmp_path / "data" / "sample", tmp_path / "data" / "tok.json"
    for _ in range(2):
        assert ensure_sample_assets(
            data_dir, tokenizer_path, vocab_size=512, max_bytes=SMALL
        ) == (data_dir, tokenizer_path)
    assert log.read_text().split() == ["write_sample_corpus", "train_tokenizer"]
    assert sample_corpus_complete(data_dir)
    assert 256 < load_tokenizer(tokenizer_path).vocab_size <= 512


def test_ensure_sample_assets_builds_once_across_concurrent_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "builds.log"
    _count_calls(monkeypatch, log)
    data_dir, tokenizer_path = tmp_path / "sample", tmp_path / "sample" / "tokenizer.json"
    ranks = [
        multiprocessing.get_context("fork").Process(
            target=ensure_sample_assets,
            args=(data_dir, tokenizer_path),
            kwargs={"vocab_size": 512, "max_bytes": SMALL},
        )
        for _ in range(3)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0]
    assert sorted(log.read_text().split()) == ["train_tokenizer", "write_sample_corpus"]
    assert sample_corpus_complete(data_dir)
    load_tokenizer(tokenizer_path)
