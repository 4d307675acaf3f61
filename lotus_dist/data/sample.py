"""A small C4-layout corpus made from the docstrings of the Python standard library.

Every Python install carries a few MB of English prose in its standard library, so a
fresh checkout can train without downloading C4. Sources are parsed with `ast`, never
imported: importing stdlib modules has side effects (`antigravity` opens a browser).
"""

import ast
import gzip
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "sample-manifest.json"

# Tests and site-packages differ between installs of the same Python version.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
# Build-specific: holds this machine's compiler flags and paths.
_SKIPPED_FILE_PREFIX = "_sysconfigdata"
# The language reference as a dict of strings: the largest block of prose in the stdlib.
_TOPICS_FILE = "pydoc_data/topics.py"
# C4 was crawled in April 2019; a fixed stamp keeps the shards byte-identical.
_TIMESTAMP = "2019-04-25T00:00:00Z"
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class _Document:
    url: str
    text: str


def _hash64(text: str) -> int:
    """A stable 64-bit hash (Python's `hash` of a str changes with every process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _stdlib_files(root: Path) -> list[Path]:
    """The stdlib's `.py` files, relative to `root`, in a fixed pseudo-random order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames
            if d not in _SKIPPED_DIRS and not d.startswith(("config-", "__pycache__"))
        ]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_SKIPPED_FILE_PREFIX):
                files.append((Path(dirpath) / name).relative_to(root))
    return sorted(files, key=lambda path: _hash64(path.as_posix()))


def _outer_definitions(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    """Classes and functions in `node` not nested in another definition, in source order."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFINITIONS):
            yield f"{prefix}.{child.name}", child
        else:
            yield from _outer_definitions(child, prefix)


def _docstring_sections(node: ast.AST, name: str) -> Iterator[str]:
    """'name, blank line, docstring' for a definition and everything defined inside it."""
    docstring = ast.get_docstring(node)
    if docstring:
        yield f"{name}\n\n{docstring}"
    for inner_name, inner in _outer_definitions(node, name):
        yield from _docstring_sections(inner, inner_name)


def _module_documents(tree: ast.Module, module: str, url: str) -> Iterator[_Document]:
    """One document for the module docstring and one per top-level class or function."""
    docstring = ast.get_docstring(tree)
    if docstring:
        yield _Document(f"{url}#L1", f"{module}\n\n{docstring}")
    for name, node in _outer_definitions(tree, module):
        sections = list(_docstring_sections(node, name))
        if sections:
            yield _Document(f"{url}#L{node.lineno}", "\n\n".join(sections))


def _topic_documents(tree: ast.Module, url: str) -> Iterator[_Document]:
    """One document per language-reference topic of `pydoc_data.topics`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield _Document(f"{url}#L{value.lineno}", value.value.strip())


def _stdlib_documents(max_bytes: int | None) -> list[_Document]:
    """All documents, or those of the first files (in hashed order) reaching `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    url_base = f"https://github.com/python/cpython/blob/v{platform.python_version()}/Lib"
    documents: list[_Document] = []
    size = 0
    for path in _stdlib_files(root):
        try:
            tree = ast.parse((root / path).read_bytes())
        except (SyntaxError, ValueError):  # a few files are deliberately invalid
            continue
        url = f"{url_base}/{path.as_posix()}"
        if path.as_posix() == _TOPICS_FILE:
            found = list(_topic_documents(tree, url))
        else:
            module = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
            found = list(_module_documents(tree, module, url))
        documents += found
        size += sum(len(doc.text.encode()) for doc in found)
        if max_bytes is not None and size >= max_bytes:
            break
    return documents


def _shard_bytes(documents: list[_Document]) -> bytes:
    """C4's JSON-lines format, gzipped with a zero mtime so equal input gives equal bytes."""
    lines = (
        json.dumps({"text": doc.text, "timestamp": _TIMESTAMP, "url": doc.url}, ensure_ascii=False)
        for doc in documents
    )
    return gzip.compress("".join(line + "\n" for line in lines).encode(), mtime=0)


def write_sample_corpus(
    out_dir: str | os.PathLike,
    n_train_shards: int = 2,
    n_val_shards: int = 1,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Write the stdlib-docstring corpus as C4 shards into `out_dir`; return its manifest.

    Documents go to validation by a hash of their URL (stable when files come and go),
    are ordered by that hash (so shards mix modules, as C4 mixes sites) and dealt
    round-robin over the shards. The folder is built under a temporary name and
    renamed into place, so an interrupted write never leaves a half corpus behind.
    `max_bytes` stops reading sources once that much text is collected (for tests).
    """
    if n_train_shards < 1 or n_val_shards < 1:
        raise ValueError("a sample corpus needs at least one train and one validation shard")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} exists and is not empty; the sample corpus is only written into a "
            "new or empty folder (remove it to rebuild)"
        )
    documents = sorted(_stdlib_documents(max_bytes), key=lambda doc: _hash64(doc.url))
    threshold = val_fraction * 2**64
    splits = {
        "train": ([d for d in documents if _hash64(d.url) >= threshold], n_train_shards),
        "validation": ([d for d in documents if _hash64(d.url) < threshold], n_val_shards),
    }
    manifest: dict[str, Any] = {"python": platform.python_version(), "splits": {}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for split, (docs, n_shards) in splits.items():
            files = [f"c4-{split}.{i:05d}-of-{n_shards:05d}.json.gz" for i in range(n_shards)]
            for i, name in enumerate(files):
                (tmp_dir / name).write_bytes(_shard_bytes(docs[i::n_shards]))
            manifest["splits"][split] = {
                "files": files,
                "documents": len(docs),
                "text_bytes": sum(len(doc.text.encode()) for doc in docs),
            }
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp_dir.chmod(0o755)  # mkdtemp makes it private to this user
        os.rename(tmp_dir, out_dir)  # atomic; replaces out_dir only if it is empty
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def sample_corpus_complete(out_dir: str | os.PathLike) -> bool:
    """Whether `out_dir` holds a finished sample corpus (its manifest is written last)."""
    return (Path(out_dir) / MANIFEST).is_file()
