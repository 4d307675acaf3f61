"""`lotus-train data prepare`: the token stream in shards with a manifest, the same bytes
whatever the workers and after an interruption, bad records counted, clear refusals."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import lotus_dist.data.prepare as prepare_module
from launcher.cli import main
from lotus_dist.data import (
    STORE_MANIFEST,
    DataError,
    DataWarning,
    LocalDocuments,
    PrepareInterrupted,
    StoreBatches,
    TokenStore,
    is_token_store,
    is_unfinished_store,
    load_tokenizer,
    prepare_store,
    tokenizer_fingerprint,
)
from lotus_dist.data.store import PROGRESS_FILE

SHARD = 5000  # tokens per shard: about 20 train shards from the test corpus


def _stream(texts, tokenizer) -> list[int]:
    return [t for ids in tokenizer.encode_batch(list(texts)) for t in [*ids, tokenizer.eos_id]]


def _store_hash(folder: Path) -> str:
    """Every file's name and bytes: equal hashes mean byte-identical stores."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _prepare(corpus, tokenizer, out, **kwargs):
    kwargs = {"workers": 1, "shard_tokens": SHARD, "progress": False, **kwargs}
    return prepare_store(str(corpus), str(tokenizer), out, **kwargs)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> Path:
    """The test corpus prepared once, uninterrupted, with one worker."""
    corpus, tokenizer = small_corpus
    out = tmp_path_factory.mktemp("reference") / "store"
    _prepare(corpus, tokenizer, out)
    return out


def test_store_holds_the_token_stream_and_a_manifest(reference, small_corpus):
    corpus, tokenizer_path = small_corpus
    tokenizer = load_tokenizer(tokenizer_path)
    manifest = json.loads((reference / STORE_MANIFEST).read_text())
    assert manifest["format"] == "lotus-token-store" and manifest["version"] == 1
    assert manifest["tokenizer"] == {"name": str(tokenizer_path), "vocab_size": 512,
                                     "sha256": tokenizer_fingerprint(tokenizer),
                                     "eos_id": tokenizer.eos_id}
    assert manifest["source"] == str(corpus) and manifest["dtype"] == "uint16"
    assert manifest["shard_tokens"] == SHARD and manifest["splits"].keys() == {"train",
                                                                                "validation"}
    store = TokenStore(reference)
    for name in ("train", "validation"):
        documents = list(LocalDocuments(corpus, name))
        expected = _stream(documents, tokenizer)
        info = manifest["splits"][name]
        assert info["documents"] == len(documents) and info["tokens"] == len(expected)
        assert info["skipped_records"] == 0 and info["data_errors"] == []
        assert info["max_token_id"] == max(expected)
        assert [s["tokens"] for s in info["shards"][:-1]] == [SHARD] * (len(info["shards"]) - 1)
        split = store.split(name)
        assert split.read_tokens(0, split.tokens).tolist() == expected
    assert len(manifest["splits"]["train"]["shards"]) > 10
    assert load_tokenizer(reference / "tokenizer.json").vocab_size == 512
    assert not (reference / PROGRESS_FILE).exists()


def test_two_workers_write_the_same_bytes(reference, small_corpus, tmp_path):
    result = _prepare(*small_corpus, tmp_path / "store", workers=2)
    assert result["workers"] == 2 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert _store_hash(tmp_path / "store") == _store_hash(reference)


@pytest.mark.parametrize("where", ["first shard", "end of train", "inside validation"])
def test_an_interrupted_prepare_resumes_to_the_same_bytes(reference, small_corpus, tmp_path,
                                                         where):
    train_shards = len(TokenStore(reference).split("train").shards)
    stop_after = {"first shard": 1, "end of train": train_shards,
                  "inside validation": train_shards + 1}[where]
    out = tmp_path / "store"
    with pytest.raises(PrepareInterrupted):
        _prepare(*small_corpus, out, stop_after_shards=stop_after)
    assert is_unfinished_store(out) and not is_token_store(out)
    # what a crash leaves behind: a half-written temporary and an unrecorded shard
    progress = json.loads((out / PROGRESS_FILE).read_text())
    split = progress["current"]["split"] if progress["current"] else "validation"
    recorded = len(progress["current"]["shards"]) if progress["current"] else 0
    (out / f".{split}-{recorded:05d}.bin.tmp").write_bytes(b"half a shard")
    (out / f"{split}-{recorded:05d}.bin").write_bytes(b"not the real shard")
    result = _prepare(*small_corpus, out, workers=2)
    assert result["resumed"] and result["tokens"] > 0
    assert _store_hash(out) == _store_hash(reference)


def test_losing_the_manifest_and_last_shards_rebuilds_the_same_bytes(reference, small_corpus,
                                                                    tmp_path):
    out = tmp_path / "store"
    _prepare(*small_corpus, out)
    (out / STORE_MANIFEST).unlink()
    for path in sorted(out.glob("train-*.bin"))[-2:]:
        path.unlink()
    _prepare(*small_corpus, out)
    assert _store_hash(out) == _store_hash(reference)


def test_max_tokens_caps_each_split_and_resumes(small_corpus, tmp_path):
    corpus, tokenizer_path = small_corpus
    tokenizer = load_tokenizer(tokenizer_path)
    _prepare(corpus, tokenizer_path, tmp_path / "whole", max_tokens=12_000, shard_tokens=1000)
    store = TokenStore(tmp_path / "whole")
    for name in ("train", "validation"):
        expected = _stream(LocalDocuments(corpus, name), tokenizer)[:12_000]
        split = store.split(name)
        assert split.read_tokens(0, split.tokens).tolist() == expected
    # stopped right where a shard ends at the cap: the resumed run has nothing left to add
    with pytest.raises(PrepareInterrupted):
        _prepare(corpus, tokenizer_path, tmp_path / "cut", max_tokens=12_000,
                 shard_tokens=1000, stop_after_shards=12)
    _prepare(corpus, tokenizer_path, tmp_path / "cut", max_tokens=12_000, shard_tokens=1000)
    assert _store_hash(tmp_path / "cut") == _store_hash(tmp_path / "whole")


def test_a_single_jsonl_or_text_file_is_one_split(small_corpus, tmp_path):
    _, tokenizer_path = small_corpus
    tokenizer = load_tokenizer(tokenizer_path)
    texts = ["the gradient subspace", "rank projection", "a third document here"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(texts) + "\n")
    for source in (jsonl, text):
        out = tmp_path / f"store-{source.suffix[1:]}"
        result = _prepare(source, tokenizer_path, out)
        assert list(result["manifest"]["splits"]) == ["train"]
        split = TokenStore(out).split("train")
        assert split.read_tokens(0, split.tokens).tolist() == _stream(texts, tokenizer)
        assert split.documents == 3
    _prepare(jsonl, tokenizer_path, tmp_path / "named", splits=["validation"])
    assert TokenStore(tmp_path / "named").splits == ["validation"]
    with pytest.raises(ValueError, match="one file, so it is one split"):
        _prepare(jsonl, tokenizer_path, tmp_path / "two", splits=["train", "validation"])


def _damaged_corpus(folder: Path) -> tuple[Path, list[str]]:
    """Two train shards with malformed lines before, between and after documents."""
    folder.mkdir()
    good = [" ".join(["word"] * (5 + i % 40)) + f" number {i}" for i in range(400)]
    lines = []
    for i, text in enumerate(good):
        if i % 37 == 0:
            lines.append("{not json")
        lines.append(json.dumps({"text": text}))
    lines.append('{"no_text": 1}')
    half = len(lines) // 2
    for k, part in enumerate((lines[:half], lines[half:])):
        data = "".join(line + "\n" for line in part).encode()
        (folder / f"c4-train.{k:05d}-of-00002.json.gz").write_bytes(gzip.compress(data, mtime=0))
    (folder / "c4-validation.00000-of-00001.json").write_text(
        json.dumps({"text": "validation text"}) + "\n")
    return folder, good


def test_malformed_records_are_counted_and_an_interruption_keeps_the_count(small_corpus,
                                                                          tmp_path):
    _, tokenizer_path = small_corpus
    corpus, good = _damaged_corpus(tmp_path / "damaged")
    with pytest.warns(DataWarning):
        _prepare(corpus, tokenizer_path, tmp_path / "whole", shard_tokens=500)
    info = json.loads((tmp_path / "whole" / STORE_MANIFEST).read_text())["splits"]["train"]
    assert info["skipped_records"] == 11 + 1 and info["documents"] == len(good)
    assert len(info["data_errors"]) == 12
    assert info["data_errors"][0]["file"].endswith("c4-train.00000-of-00002.json.gz")
    assert info["data_errors"][0]["offset"] == 0 and "not JSON" in info["data_errors"][0]["reason"]
    assert "no \"text\" field" in info["data_errors"][-1]["reason"]
    for stop_after in (2, 5):
        out = tmp_path / f"cut-{stop_after}"
        with pytest.warns(DataWarning), pytest.raises(PrepareInterrupted):
            _prepare(corpus, tokenizer_path, out, shard_tokens=500, stop_after_shards=stop_after)
        with pytest.warns(DataWarning):
            _prepare(corpus, tokenizer_path, out, shard_tokens=500)
        assert _store_hash(out) == _store_hash(tmp_path / "whole")
    with pytest.raises(DataError, match=re.escape("c4-train.00000-of-00002.json.gz: line 1")):
        _prepare(corpus, tokenizer_path, tmp_path / "stop", on_error="stop")


def test_a_large_vocabulary_is_stored_as_uint32(reference, small_corpus, tmp_path,
                                                monkeypatch):
    monkeypatch.setattr(prepare_module, "dtype_for", lambda vocab_size: "uint32")
    _prepare(*small_corpus, tmp_path / "wide")
    wide, narrow = TokenStore(tmp_path / "wide"), TokenStore(reference)
    assert wide.manifest["dtype"] == "uint32"
    assert (tmp_path / "wide" / "train-00000.bin").stat().st_size == 4 * SHARD
    for a, b in zip(StoreBatches(wide.split("train"), 31, 8),
                    StoreBatches(narrow.split("train"), 31, 8, repeat=False)):
        assert a.dtype == torch.long and torch.equal(a, b)


def test_other_settings_or_foreign_folders_are_refused(reference, small_corpus, tmp_path):
    corpus, tokenizer = small_corpus
    again = _prepare(corpus, tokenizer, reference)
    assert again["already_done"] and again["tokens"] == 0
    with pytest.raises(DataError, match="already holds a token store prepared with other"):
        _prepare(corpus, tokenizer, reference, shard_tokens=SHARD + 1)
    out = tmp_path / "store"
    with pytest.raises(PrepareInterrupted):
        _prepare(corpus, tokenizer, out, stop_after_shards=1)
    with pytest.raises(DataError, match="unfinished prepare with other settings"):
        _prepare(corpus, tokenizer, out, max_tokens=100)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="not a token store's"):
        _prepare(corpus, tokenizer, foreign)


def test_cli_prepares_the_sample_corpus_offline(small_corpus, tmp_path, capsys):
    corpus, tokenizer = small_corpus
    out = tmp_path / "store"
    main(["data", "prepare", "--data", str(corpus), "--tokenizer", str(tokenizer), "--out",
          str(out), "--workers", "2", "--max-tokens", "30000", "--split", "train,validation",
          "--shard-tokens", "20000"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"prepared .*: train 30,000 tokens / \d+ documents / 2 shards / 0 skipped; "
                    r"validation [\d,]+ tokens .*; uint16; [\d,]+ tokens in [\d.]+ s "
                    r"\([\d,]+ tok/s, 2 workers\)", line), line
    main(["data", "prepare", "--data", str(corpus), "--tokenizer", str(tokenizer), "--out",
          str(out), "--workers", "2", "--max-tokens", "30000", "--shard-tokens", "20000"])
    assert "already a finished token store" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"lotus-train: error: .*no 'train' files"):
        main(["data", "prepare", "--data", str(tmp_path), "--tokenizer", str(tokenizer),
              "--out", str(tmp_path / "empty-store")])
    assert not (tmp_path / "empty-store").exists()  # refused before writing anything
