"""Engines that save in their own format (DeepSpeed) inside our atomic step directories.

No DeepSpeed needed: a stand-in implements the ``NativeCheckpoint`` protocol.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.checkpoint import CheckpointError, NativeCheckpoint, load, save
from launcher.train_state import TrainState


class FolderState:
    """Writes one number into its own folder, as DeepSpeed writes its per-rank files."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def save_native(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "value.txt").write_text(str(self.value))

    def load_native(self, path: Path) -> None:
        self.value = int((path / "value.txt").read_text())


def test_a_native_state_is_saved_inside_the_published_step_directory(tmp_path):
    assert isinstance(FolderState(), NativeCheckpoint)
    path = save(tmp_path, 3, {"train_state": TrainState(step=3), "engine": FolderState(7)})
    assert (path / "engine" / "value.txt").read_text() == "7"
    assert not list(tmp_path.glob("*.tmp"))
    restored = {"train_state": TrainState(), "engine": FolderState()}
    load(path, restored)
    assert restored["engine"].value == 7 and restored["train_state"].step == 3


def test_a_checkpoint_without_the_native_folder_fails_clearly(tmp_path):
    path = save(tmp_path, 3, {"train_state": TrainState(step=3)})
    with pytest.raises(CheckpointError, match="has no engine/ folder: it was written by another"):
        load(path, {"train_state": TrainState(), "engine": FolderState()})


def test_a_native_checkpoint_loaded_by_a_dcp_engine_fails_clearly(tmp_path):
    path = save(tmp_path, 3, {"train_state": TrainState(step=3), "engine": FolderState(7)})
    with pytest.raises(CheckpointError, match="does not match this run's state"):
        load(path, {"train_state": TrainState(), "model": {"w": torch.zeros(2)}})
