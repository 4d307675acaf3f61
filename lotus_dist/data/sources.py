"""Document sources: the texts of one split, in a fixed order, resumable from a position.

A position is plain data (lists, dicts, numbers, strings) so it can go into a
checkpoint. Reaching it skips raw records without tokenising anything; a local source
does that only once iteration starts (seeking just stores the position), so a damaged
file is reported where the data is read.

Bad data (a malformed record, a truncated or non-gzip file) is handled by `on_error`:
"skip" counts it in `skipped`, keeps the event in `errors` and warns once per file;
"stop" raises DataError naming the file and the byte offset.
"""

import gzip
import json
import os
import re
import warnings
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

Position = Any
"""Where the next document starts; None is the start of the split."""

OnError = Literal["skip", "stop"]
ON_ERROR_CHOICES = ("skip", "stop")

# A file belongs to a split when its name matches one of these (C4's layout first).
SPLIT_PATTERNS = ("c4-{split}.*", "{split}.*", "{split}-*", "{split}/*")
JSON_LINES_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
# Hub datasets that need a named configuration.
HUB_CONFIGS = {"allenai/c4": "en"}
# Recent data errors kept for the log: enough to see a pattern, bounded for long runs.
MAX_ERRORS_KEPT = 100
# What reading a damaged file raises: truncated gzip (EOFError), not gzip or a bad
# CRC (gzip.BadGzipFile, an OSError), a corrupt deflate stream (zlib.error), I/O.
_READ_ERRORS = (OSError, EOFError, zlib.error)


class DataError(ValueError):
    """The corpus cannot be read as configured; the message names the file (and the byte
    offset) and what to do. Never a checkpoint problem."""


class DataWarning(UserWarning):
    """Bad data skipped under data.on_error=skip: once per file, naming file and offset."""


class DocumentSource(ABC):
    """The documents of one split; iterating runs from the current position to the end."""

    def __init__(self, description: str, on_error: OnError = "skip") -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error={on_error!r} must be one of {ON_ERROR_CHOICES}")
        self.description = description
        self.on_error = on_error
        self.skipped = 0
        """Bad data skipped so far: malformed records (bad JSON, missing or non-string
        text) and unreadable rest-of-files (truncated or non-gzip)."""
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS_KEPT)
        """The latest skips, each {"file", "offset", "reason"}."""
        self.errors_total = 0
        """Skips recorded in `errors` ever, including those it no longer holds."""
        self._warned: set[str] = set()
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
        """Valid documents from the current position on, reporting bad data to `_bad`."""

    def __iter__(self) -> Iterator[str]:
        from_start, self._from_start = self._from_start, False
        found = False
        for text in self._documents():
            found = True
            yield text
        if from_start and not found:
            raise DataError(
                f"{self.description} holds no documents ({self.skipped} malformed records "
                "or unreadable files skipped)"
            )

    def _bad(self, file: str, offset: int, reason: str, stop_message: str) -> None:
        """Bad data at `offset` of `file` (`reason` says where, offset included, and
        what): raise DataError(stop_message) under "stop"; under "skip" count it, keep
        the event and warn the first time `file` has one, so a damaged shard is seen
        once instead of flooding the log."""
        if self.on_error == "stop":
            raise DataError(stop_message)
        self.skipped += 1
        self.errors.append({"file": file, "offset": offset, "reason": reason})
        self.errors_total += 1
        if file not in self._warned:
            self._warned.add(file)
            warnings.warn(
                f"data.on_error=skip: skipping bad data in {file}: {reason} (further "
                "problems in this file are only counted)",
                DataWarning,
                stacklevel=2,
            )


def _byte_lines(stream: BinaryIO) -> Iterator[tuple[int, str]]:
    """(byte offset of the line in the decompressed data, line) for every line.

    Bytes are decoded line by line: a UTF-8 character never spans a newline byte, so
    this equals decoding the whole file. A stray invalid byte costs one character.
    """
    offset = 0
    for line in stream:
        yield offset, line.decode("utf-8", errors="replace")
        offset += len(line)


def _paragraphs(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Blank-line-separated paragraphs (with the offset of their first line), each
    without its trailing newline."""
    paragraph: list[str] = []
    start = 0
    for offset, line in lines:
        if not line.strip():
            if paragraph:
                yield start, "\n".join(paragraph)
                paragraph = []
            continue
        if not paragraph:
            start = offset
        paragraph.append(line.rstrip("\r\n"))
    if paragraph:
        yield start, "\n".join(paragraph)


def _json_text(line: str) -> tuple[str | None, str]:
    """(the `text` field of a JSON-lines record, "") or (None, what is wrong with it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    if "text" not in record:
        return None, 'no "text" field'
    text = record["text"]
    if not isinstance(text, str):
        return None, f'"text" is {type(text).__name__}, not a string'
    return text, ""


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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _file_size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "size unknown"


class LocalDocuments(DocumentSource):
    """Documents of one split of a local folder; the position is [file index, record index].

    JSON-lines files (`.json` as in C4, `.jsonl`, gzipped or not) give one document per
    line, from its `text` field. Text files (`.txt`, `.txt.gz`) give one document per
    blank-line-separated paragraph, so a long book does not become one giant document.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        on_error: OnError = "skip",
        files: list[Path] | None = None,
    ) -> None:
        """`files` replaces the split's files in `path` (e.g. one `.jsonl` given as the
        whole split); by default they are found by name (`find_split_files`)."""
        super().__init__(f"data.path={str(path)!r} (split {split!r})", on_error)
        self.files = (list(files) if files is not None
                      else find_split_files(Path(path).expanduser(), split))
        self._file = 0
        self._record = 0
        self._read = 0
        self._raw: BinaryIO | None = None  # the file being read, for bytes_read()

    def total_bytes(self) -> int:
        """The split's size on disk (compressed for gzip files): for progress and ETA."""
        return sum(_size(path) for path in self.files)

    def bytes_read(self) -> int:
        """Bytes on disk read so far: earlier files whole, the current one to where the
        reader stands (at most a read-ahead chunk past the last document)."""
        done = sum(_size(path) for path in self.files[: self._file])
        raw = self._raw
        if raw is not None and not raw.closed:
            done += raw.tell()
        return done

    def position(self) -> list[int]:
        return [self._file, self._record]

    def _seek(self, position: Position) -> None:
        file, record = position if position is not None else (0, 0)
        if not 0 <= file <= len(self.files) or record < 0:
            raise DataError(
                f"saved position {position} does not fit the {len(self.files)} files of "
                f"{self.description}; did the corpus change?"
            )
        self._file, self._record = file, record

    def _documents(self) -> Iterator[str]:
        while self._file < len(self.files):
            yield from self._file_documents(self.files[self._file])
            self._file, self._record = self._file + 1, 0

    def _file_documents(self, path: Path) -> Iterator[str]:
        """The documents of `path` from record `self._record` on; an unreadable file
        part ends the file (under "skip") once the good records before it are out."""
        self._read = 0
        try:
            raw = open(path, "rb")  # noqa: SIM115 (closed below; its tell() is needed)
        except OSError as err:
            self._unreadable(path, 0, err)
            return
        self._raw = raw
        with raw:
            try:
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
                yield from self._records(path, stream)
            except _READ_ERRORS as err:
                self._unreadable(path, raw.tell(), err)

    def _records(self, path: Path, stream: BinaryIO) -> Iterator[str]:
        """Records from `self._record` on; `self._read` counts every record read from
        `path`, including those skipped over to reach a resume position."""
        json_lines = path.name.endswith(JSON_LINES_SUFFIXES)
        lines = _byte_lines(stream)
        records = lines if json_lines else _paragraphs(lines)
        for offset, record in records:
            self._read += 1
            if self._read <= self._record:
                continue
            self._record = self._read
            text, problem = _json_text(record) if json_lines else (record, "")
            if text is None:
                self._malformed(path, offset, problem)
            else:
                yield text

    def _malformed(self, path: Path, offset: int, problem: str) -> None:
        decompressed = " of the decompressed data" if path.suffix == ".gz" else ""
        where = f"line {self._record}, at byte {offset}{decompressed}"
        self._bad(
            str(path), offset, f"{where}: {problem}",
            f"{path}: {where} is malformed: {problem}. Fix or remove that line, or set "
            "data.on_error=skip to skip malformed records (they are counted and logged).",
        )

    def _unreadable(self, path: Path, offset: int, err: BaseException) -> None:
        kind = "truncated or not gzip" if path.suffix == ".gz" else "unreadable"
        what = f"{type(err).__name__}: {err}"
        reason = (f"{kind}: reading failed at byte {offset} of the file, after record "
                  f"{self._read} ({what}); the rest of the file is skipped")
        self._bad(
            str(path), offset, reason,
            f"{path} cannot be read at byte {offset} ({_file_size(path)}), after record "
            f"{self._read}: {what}. The file is {kind}: replace it (download it again), or set "
            "data.on_error=skip to skip the rest of it (counted and logged).",
        )


class HubDocuments(DocumentSource):
    """A streamed Hugging Face dataset; the position is the dataset's own state_dict.

    Seeking opens the dataset again: a streamed dataset applies a loaded state to every
    later iteration, so opening it afresh is the way back to the start.
    """

    def __init__(
        self, name: str, split: str, config: str | None = None, on_error: OnError = "skip"
    ) -> None:
        super().__init__(f"data.path={name!r} (split {split!r})", on_error)
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
                f"Hugging Face hub (config {self.config!r}, split {self.split!r}) failed: "
                f"{err}. Without network access, set data.path to a local C4-layout folder, "
                "or to a token store that lotus-train data prepare wrote where the hub is "
                "reachable"
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
        # A streamed row has no byte offset: its "offset" counts rows from where this
        # pass began (the start of the split, or the resume position).
        for row_index, row in enumerate(self._dataset):
            self._state = self._dataset.state_dict()
            if isinstance(row["text"], str):
                yield row["text"]
                continue
            where = f"row {row_index} of this pass (split {self.split!r})"
            problem = f'"text" is {type(row["text"]).__name__}, not a string'
            self._bad(
                self.name, row_index, f"{where}: {problem}",
                f"data.path={self.name!r}: {where} is malformed: {problem}. Set "
                "data.on_error=skip to skip malformed records (they are counted and logged).",
            )


def _looks_like_hub_name(path: str) -> bool:
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) is not None


def open_documents(
    path: str | os.PathLike, split: str, on_error: OnError = "skip"
) -> DocumentSource:
    """`data.path` as a source: an existing local folder, else an `owner/name` hub dataset.

    `on_error` is `data.on_error`: what bad data (malformed records, unreadable files) does.
    """
    if Path(path).expanduser().exists() or not _looks_like_hub_name(str(path)):
        return LocalDocuments(path, split, on_error)
    return HubDocuments(str(path), split, HUB_CONFIGS.get(str(path)), on_error)
