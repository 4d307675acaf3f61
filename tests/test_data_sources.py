"""Document sources: file layouts, malformed records, clear errors, resumable positions."""

import gzip
import json
from pathlib import Path

import pytest

from lotus_dist.data import DataError, DataWarning, HubDocuments, LocalDocuments, open_documents


def _write_json_lines(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _records(texts: list[str]) -> list[str]:
    return [json.dumps({"text": text, "timestamp": "2019-04-25T00:00:00Z"}) for text in texts]


@pytest.fixture
def c4_folder(tmp_path: Path) -> Path:
    _write_json_lines(tmp_path / "c4-train.00000-of-00002.json.gz", _records(["a0", "a1", "a2"]))
    _write_json_lines(tmp_path / "c4-train.00001-of-00002.json.gz", _records(["b0", "b1"]))
    _write_json_lines(tmp_path / "c4-validation.00000-of-00001.json.gz", _records(["v0"]))
    return tmp_path


def test_c4_layout_splits_are_read_in_shard_order(c4_folder: Path) -> None:
    assert list(LocalDocuments(c4_folder, "train")) == ["a0", "a1", "a2", "b0", "b1"]
    assert list(LocalDocuments(c4_folder, "validation")) == ["v0"]


def test_plain_json_lines_and_text_files_gzipped_or_not(tmp_path: Path) -> None:
    _write_json_lines(tmp_path / "train.jsonl", _records(["j0", "j1"]))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "book.txt").write_text("First paragraph,\ntwo lines.\n\n\nSecond.\n")
    (tmp_path / "train-extra.txt.gz").write_bytes(gzip.compress(b"Gzipped paragraph.\n"))
    source = LocalDocuments(tmp_path, "train")
    assert [path.name for path in source.files] == ["book.txt", "train-extra.txt.gz", "train.jsonl"]
    assert list(source) == [
        "First paragraph,\ntwo lines.", "Second.", "Gzipped paragraph.", "j0", "j1"
    ]


def test_malformed_records_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [
        '{"text": "good 1"}',
        "{not json",
        '{"url": "no text"}',
        '{"text": 5}',
        "[1, 2]",
        "",
        '{"text": "good 2"}',
    ]
    _write_json_lines(tmp_path / "train.jsonl", lines)
    source = LocalDocuments(tmp_path, "train")
    with pytest.warns(DataWarning, match=r"train\.jsonl: line 2, at byte 19: not JSON"):
        assert list(source) == ["good 1", "good 2"]
    assert source.skipped == 5


@pytest.mark.parametrize("path", ["missing", "missing/corpus/train"])
def test_missing_path_is_an_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*does not exist"):
        open_documents(path, "train")
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*does not exist"):
        open_documents(tmp_path / path, "train")


def test_folder_without_split_files_is_an_error_naming_what_was_looked_for(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.md").write_text("not a corpus")
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*'train'.*c4-train\.\*"):
        LocalDocuments(tmp_path, "train")


def test_corpus_without_documents_is_an_error_naming_the_key(tmp_path: Path) -> None:
    _write_json_lines(tmp_path / "train.jsonl", ["{bad", '{"text": null}'])
    with pytest.warns(DataWarning), pytest.raises(
        DataError, match=r"data\.path=.*no documents \(2 malformed"
    ):
        list(LocalDocuments(tmp_path, "train"))


@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 5])
def test_seeking_a_saved_position_resumes_after_the_last_document(
    c4_folder: Path, consumed: int
) -> None:
    source = LocalDocuments(c4_folder, "train")
    documents = iter(source)
    for _ in range(consumed):
        next(documents)
    position = json.loads(json.dumps(source.position()))
    resumed = LocalDocuments(c4_folder, "train")
    resumed.seek(position)
    assert list(resumed) == ["a0", "a1", "a2", "b0", "b1"][consumed:]


def test_hub_source_streams_text_only_and_resumes_from_the_dataset_state(
    c4_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    real_load = datasets.load_dataset
    files = sorted(str(path) for path in c4_folder.glob("c4-train.*"))

    def load_local(name, config, split, streaming):
        assert (name, config, split, streaming) == ("allenai/c4", "en", "train", True)
        return real_load("json", data_files={split: files}, split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_local)
    source = open_documents("allenai/c4", "train")
    assert isinstance(source, HubDocuments)
    documents = iter(source)
    assert [next(documents) for _ in range(4)] == ["a0", "a1", "a2", "b0"]
    position = json.loads(json.dumps(source.position()))
    resumed = HubDocuments("allenai/c4", "train", "en")
    resumed.seek(position)
    assert list(resumed) == ["b1"]


def test_unreachable_hub_dataset_is_an_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"data\.path='allenai/c4'.*no network"):
        open_documents("allenai/c4", "train")
