"""Document sources: the texts of one split, in a fixed order, resumable from a position.

A position is plain data (lists, dicts, numbers, strings) so it can go into a
checkpoint; seeking to it skips raw records without tokenising anything.
"""

import gzip
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

Position = Any
"""Where the next document starts; None is the start of the split."""

# A file belongs to a split when its name matches one of these (C4's layout first).
SPLIT_PATTERNS = ("c4-{split}.*", "{split}.*", "{split}-*", "{split}/*")
JSON_LINES_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
# Hub datasets that need a named configuration.
HUB_CONFIGS = {"allenai/c4": "en"}


class DataError(ValueError):
    """The corpus cannot be read as configured; the message names the file (and the byte
    offset) and what to do. Never a checkpoint problem."""


class DocumentSource(ABC):
    """The documents of one split; iterating runs from the current position to the end."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.skipped = 0
        """Malformed records skipped so far (bad JSON, missing or non-string text)."""
        # Only a pass from the start that finds nothing means the corpus is empty.
        self._from_start = True

    @abstractmethod
    def position(self) -> Position:
        """Where the document after the last one yielded starts."""

    def seek(self, position: Position) -> None:
        """Make the next iteration start at `position` (None: the start of the split)."""
        self._seek(position)
        self._from_start = position is None

    @abstractmethod
    def _seek(self, position: Position) -> None:
        """Move to `position` (None: the start of the split)."""

    @abstractmethod
    def _documents(self) -> Iterator[str]:
        """Valid documents from the current position on, counting malformed ones."""

    def __iter__(self) -> Iterator[str]:
        from_start, self._from_start = self._from_start, False
        found = False
        for text in self._documents():
            found = True
            yield text
        if from_start and not found:
            raise ValueError(
                f"{self.description} holds no documents ({self.skipped} malformed records skipped)"
            )


def _open_text(path: Path) -> TextIO:
    # A stray invalid byte should cost one character, not the whole run.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _paragraphs(lines: TextIO) -> Iterator[str]:
    """Blank-line-separated paragraphs, each without its trailing newline."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _json_text(line: str) -> str | None:
    """The `text` field of a JSON-lines record, or None when the record is malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    text = record.get("text") if isinstance(record, dict) else None
    return text if isinstance(text, str) else None


def find_split_files(folder: Path, split: str) -> list[Path]:
    """The files of `split` in `folder`, sorted by name; a clear error when there are none."""
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"data.path={str(folder)!r} {problem}")
    patterns = [pattern.format(split=split) for pattern in SPLIT_PATTERNS]
    suffixes = JSON_LINES_SUFFIXES + TEXT_SUFFIXES
    files = {
        path
        for pattern in patterns
        for path in folder.glob(pattern)
        if path.is_file() and path.name.endswith(suffixes)
    }
    if not files:
        raise FileNotFoundError(
            f"data.path={str(folder)!r} has no {split!r} files: looked for {', '.join(patterns)} "
            f"ending in {', '.join(suffixes)}"
        )
    return sorted(files)


class LocalDocuments(DocumentSource):
    """Documents of one split of a local folder; the position is [file index, record index].

    JSON-lines files (`.json` as in C4, `.jsonl`, gzipped or not) give one document per
    line, from its `text` field. Text files (`.txt`, `.txt.gz`) give one document per
    blank-line-separated paragraph, so a long book does not become one giant document.
    """

    def __init__(self, path: str | os.PathLike, split: str) -> None:
        super().__init__(f"data.path={str(path)!r} (split {split!r})")
        self.files = find_split_files(Path(path).expanduser(), split)
        self._file = 0
        self._record = 0

    def position(self) -> list[int]:
        return [self._file, self._record]

    def _seek(self, position: Position) -> None:
        file, record = position if position is not None else (0, 0)
        if not 0 <= file <= len(self.files) or record < 0:
            raise ValueError(
                f"saved position {position} does not fit the {len(self.files)} files of "
                f"{self.description}; did the corpus change?"
            )
        self._file, self._record = file, record

    def _documents(self) -> Iterator[str]:
        while self._file < len(self.files):
            path = self.files[self._file]
            json_lines = path.name.endswith(JSON_LINES_SUFFIXES)
            with _open_text(path) as lines:
                records = lines if json_lines else _paragraphs(lines)
                for record in islice(records, self._record, None):
                    self._record += 1
                    text = _json_text(record) if json_lines else record
                    if text is None:
                        self.skipped += 1
                    else:
                        yield text
            self._file, self._record = self._file + 1, 0


class HubDocuments(DocumentSource):
    """A streamed Hugging Face dataset; the position is the dataset's own state_dict.

    Seeking opens the dataset again: a streamed dataset applies a loaded state to every
    later iteration, so opening it afresh is the way back to the start.
    """

    def __init__(self, name: str, split: str, config: str | None = None) -> None:
        super().__init__(f"data.path={name!r} (split {split!r})")
        self.name, self.split, self.config = name, split, config
        self.seek(None)

    def _open(self) -> Any:
        import datasets  # slow to import, and only needed for hub data

        try:
            dataset = datasets.load_dataset(
                self.name, self.config, split=self.split, streaming=True
            )
        except Exception as err:
            raise FileNotFoundError(
                f"data.path={self.name!r} is not a local folder, and streaming it from the "
                f"Hugging Face hub (config {self.config!r}, split {self.split!r}) failed: {err}"
            ) from err
        # Only `text`: C4's timestamp column breaks torch formatting.
        return dataset.select_columns(["text"])

    def position(self) -> Position:
        return self._state

    def _seek(self, position: Position) -> None:
        self._dataset = self._open()
        if position is not None:
            self._dataset.load_state_dict(position)
        self._state = position

    def _documents(self) -> Iterator[str]:
        for row in self._dataset:
            self._state = self._dataset.state_dict()
            if isinstance(row["text"], str):
                yield row["text"]
            else:
                self.skipped += 1


def _looks_like_hub_name(path: str) -> bool:
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) is not None


def open_documents(path: str | os.PathLike, split: str) -> DocumentSource:
    """`data.path` as a source: an existing local folder, else an `owner/name` hub dataset."""
    if Path(path).expanduser().exists() or not _looks_like_hub_name(str(path)):
        return LocalDocuments(path, split)
    return HubDocuments(str(path), split, HUB_CONFIGS.get(str(path)))
