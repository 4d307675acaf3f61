"""Per-file checksums: recorded in COMPLETE.json at save, verified at every load path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_checkpoint import _free_port, assert_same_tensors, full_state

from launcher import checkpoint
from launcher.checkpoint import MARKER, CheckpointError, load, load_model_weights, save
from launcher.train_state import ModelState


def big_state(seed: int = 0) -> dict:
    """Mostly one 400 kB tensor, so the middle of its shard is tensor data."""
    torch.manual_seed(seed)
    state, _, _ = full_state(seed, 1)
    state["big"] = {"w": torch.randn(100_000)}
    return state


def flip_one_byte(file: Path, where: float = 0.5) -> None:
    """Flip one bit in ``file`` without changing its size (a silent disk error)."""
    data = bytearray(file.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    file.write_bytes(bytes(data))


def only_shard(path: Path) -> Path:
    (shard,) = path.glob("*.distcp")
    return shard


def largest_shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_marker_records_size_and_crc_of_every_file(tmp_path):
    path = save(tmp_path, 1, big_state())
    marker = json.loads((path / MARKER).read_text())
    on_disk = {p.name for p in path.iterdir()} - {MARKER}
    assert marker["checksum"] == "crc32"
    assert set(marker["files"]) == on_disk == {".metadata", "__0_0.distcp"}
    for name, entry in marker["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert len(entry["crc32"]) == 8


def test_flipped_byte_in_a_shard_is_named_on_load(tmp_path):
    path = save(tmp_path, 1, big_state())
    shard = only_shard(path)
    size = shard.stat().st_size
    flip_one_byte(shard)
    assert shard.stat().st_size == size
    with pytest.raises(CheckpointError) as info:
        load(path, big_state(seed=1))
    message = str(info.value)
    assert f"{shard.name} does not match the crc32" in message
    assert str(path) in message and "Delete it" in message


def test_flipped_byte_is_named_by_the_export_readers(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 3))
    path = save(tmp_path, 1, {"model": ModelState(model)})
    flip_one_byte(only_shard(path))
    assert checkpoint.stored_model_shapes(path)  # reads only .metadata, which is intact
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match"):
        load_model_weights(path, torch.nn.Sequential(torch.nn.Linear(300, 300),
                                                     torch.nn.Linear(300, 3)))
    flip_one_byte(path / ".metadata", where=0.9)
    with pytest.raises(CheckpointError, match=r"\.metadata does not match"):
        checkpoint.stored_model_shapes(path)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints written before checksums were recorded load unchecked."""
    saved = big_state()
    path = save(tmp_path, 1, saved)
    marker = json.loads((path / MARKER).read_text())
    del marker["files"], marker["checksum"]
    (path / MARKER).write_text(json.dumps(marker))
    target = big_state(seed=1)
    load(path, target)
    assert torch.equal(target["big"]["w"], saved["big"]["w"])


def test_malformed_checksum_entry_is_a_clear_error(tmp_path):
    path = save(tmp_path, 1, big_state())
    marker = json.loads((path / MARKER).read_text())
    marker["files"]["__0_0.distcp"] = "deadbeef"
    (path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=f"its {MARKER} is malformed"):
        load(path, big_state(seed=1))


def _two_ranks(rank: int, port: int, ckpt_dir: str, out_dir: str) -> None:
    """Save on two ranks, damage one file (rank 0), load on both: record each rank's error."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        path = save(ckpt_dir, 1, big_state())
        dist.barrier()
        if rank == 0:
            flip_one_byte(largest_shard(path))
            Path(out_dir, "damaged.txt").write_text(largest_shard(path).name)
        dist.barrier()
        try:
            load(path, big_state(seed=1))
            message = "loaded"
        except CheckpointError as e:
            message = str(e)
        Path(out_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_checks_and_raise_the_same_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_two_ranks, args=(_free_port(), str(tmp_path / "ckpt"), str(out)), nprocs=2)
    messages = [(out / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    assert f"{(out / 'damaged.txt').read_text()} does not match the crc32" in messages[0]


@pytest.mark.slow
def test_two_rank_checksums_verify_in_one_process(tmp_path):
    """The hashes gathered from both ranks' shares describe the files one process reads."""
    mp.spawn(_save_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    path = tmp_path / "step-1"
    marker = json.loads((path / MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in path.iterdir()} - {MARKER}
    target = big_state(seed=1)
    load(path, target)
    assert_same_tensors(target["big"], big_state()["big"])


def _save_two_ranks(rank: int, port: int, ckpt_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        save(ckpt_dir, 1, big_state())
    finally:
        dist.destroy_process_group()


class FolderState:
    """A NativeCheckpoint stand-in (DeepSpeed writes its own files the same way)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def save_native(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "value.txt").write_text(f"{self.value:08d}")

    def load_native(self, path: Path) -> None:
        self.value = int((path / "value.txt").read_text())


def test_native_files_are_checksummed_too(tmp_path):
    path = save(tmp_path, 1, {"train_state": {"step": 1}, "engine": FolderState(7)})
    marker = json.loads((path / MARKER).read_text())
    assert "engine/value.txt" in marker["files"]
    (path / "engine" / "value.txt").write_text("00000008")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"engine/value\.txt does not match"):
        load(path, {"train_state": {"step": 0}, "engine": FolderState()})
