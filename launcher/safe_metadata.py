"""Reading a DCP checkpoint without running code that its files could carry.

DCP's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain
``pickle.load``, and its ``DefaultLoadPlanner.load_bytes`` reads every non-tensor entry
(ints, strings, nested dicts, pickled by ``torch.save``) with
``torch.load(weights_only=False)``. Either one runs whatever a crafted pickle asks for
(a ``__reduce__`` that calls ``os.system``) on an ordinary resume or export.

Here ``.metadata`` goes through an unpickler that resolves only the classes a DCP
metadata file holds (the dataclasses of ``torch.distributed.checkpoint.metadata``, the
file reader's ``_StorageInfo``, ``torch.Size``, dtypes, the layout helper and a path),
and byte entries go through ``torch.load(weights_only=True)``, which admits plain
containers, numbers, strings and tensors. Anything else raises ``UnsafeContentError``
before a single object of it is built; ``launcher.checkpoint`` reports it as a
CheckpointError.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

_DCP_METADATA = "torch.distributed.checkpoint.metadata"

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch.layout pickles (strided)
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: the directory it was saved to
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})
"""The (module, name) pairs a ``.metadata`` may name, besides torch's dtypes: what
``torch/distributed/checkpoint/metadata.py`` defines plus the few types its fields
hold, as found by listing the globals of our own checkpoints' metadata."""


class UnsafeContentError(pickle.UnpicklingError):
    """A checkpoint file names an object no checkpoint holds; nothing of it was built."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeContentError(f"{module}.{name} in .metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeContentError("a persistent reference in .metadata")


def load_metadata(stream: io.BufferedIOBase) -> Metadata:
    """Unpickle a DCP ``.metadata`` stream with the allowlist; it must hold a Metadata."""
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeContentError(f"a {type(metadata).__name__} instead of DCP Metadata "
                                 "in .metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by the allowlisting unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream)
        if metadata.storage_meta is None:  # older DCP versions wrote none
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_plain_value(value: io.BytesIO, fqn: str) -> Any:
    """A byte entry (a non-tensor value that DCP wrote with ``torch.save``), loaded with
    ``weights_only=True``: containers, numbers, strings and tensors only."""
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        what = found.group(1) if found else "an object weights_only refuses"
        raise UnsafeContentError(f"{what} in entry {fqn}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with byte entries read by ``load_plain_value``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_plain_value(value, fqn)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded
