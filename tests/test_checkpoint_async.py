"""save_async + PendingSave.publish: the same checkpoint as save, written in the background."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_checkpoint import _free_port, assert_same_tensors, full_state, train_state
from torch.distributed.checkpoint import FileSystemWriter

from launcher import checkpoint
from launcher.checkpoint import MARKER, CheckpointError, find_latest, load, save, save_async


def wait_done(pending: checkpoint.PendingSave, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pending.done():
        assert time.monotonic() < deadline, "background save did not finish"
        time.sleep(0.01)


def loaded(path: Path) -> dict:
    target, _, _ = full_state(seed=1, step=0)
    marker = load(path, target)
    return {"marker": marker, "model": target["model"], "train_state": target["train_state"],
            "state": target}


def test_async_save_then_publish_equals_a_synchronous_save(tmp_path):
    state, _, _ = full_state(seed=0, step=3)
    sync_path = save(tmp_path / "sync", 3, state)
    pending = save_async(tmp_path / "async", 3, state)
    assert pending.step == 3 and pending.path == tmp_path / "async" / "step-3"
    wait_done(pending)
    assert not pending.path.exists(), "published before publish()"
    assert find_latest(tmp_path / "async") is None
    assert pending.publish() == pending.path
    assert find_latest(tmp_path / "async") == pending.path
    assert sorted(p.name for p in (tmp_path / "async").iterdir()) == ["step-3"]

    sync, background = loaded(sync_path), loaded(pending.path)
    assert_same_tensors(background["model"], sync["model"])
    assert background["train_state"] == sync["train_state"] == train_state(3)
    opt_sync, opt_async = sync["state"]["optimizer"], background["state"]["optimizer"]
    assert opt_sync["param_groups"] == opt_async["param_groups"]
    for key in opt_sync["state"]:
        assert_same_tensors(opt_async["state"][key], opt_sync["state"][key])
    files = background["marker"]["files"]
    assert set(files) == {p.name for p in pending.path.iterdir()} - {MARKER}
    assert pending.publish() == pending.path  # a second call is a no-op


def test_changes_after_save_async_returns_do_not_reach_the_checkpoint(tmp_path):
    state, model, _ = full_state(seed=0, step=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pending = save_async(tmp_path, 3, state)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(1.0)  # training goes on while the write runs
    state["train_state"]["step"] = 99
    pending.publish()
    got = loaded(pending.path)
    assert_same_tensors(got["model"], before)
    assert got["train_state"]["step"] == 3


def test_a_save_cannot_start_while_one_is_unpublished(tmp_path):
    pending = save_async(tmp_path, 1, full_state(0, 1)[0])
    with pytest.raises(CheckpointError, match="step-1 from save_async is not published"):
        save(tmp_path, 2, full_state(0, 2)[0])
    with pytest.raises(CheckpointError, match="not published"):
        save_async(tmp_path, 2, full_state(0, 2)[0])
    pending.publish()
    save_async(tmp_path, 2, full_state(0, 2)[0], keep_latest=1).publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]


def test_a_failed_background_write_raises_on_publish_and_keeps_the_previous(tmp_path,
                                                                           monkeypatch):
    first = save(tmp_path, 1, full_state(0, 1)[0])

    def finish(self, metadata, results):
        raise RuntimeError("simulated write failure")

    monkeypatch.setattr(FileSystemWriter, "finish", finish)
    pending = save_async(tmp_path, 2, full_state(0, 2)[0])
    wait_done(pending)
    with pytest.raises(CheckpointError, match="simulated write failure"):
        pending.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no step-2.tmp left
    assert find_latest(tmp_path) == first
    monkeypatch.undo()
    save_async(tmp_path, 3, full_state(0, 3)[0]).publish()  # the next save works
    assert find_latest(tmp_path).name == "step-3"


def _async_on_two_ranks(rank: int, port: int, ckpt_dir: str) -> None:
    """Two background saves; the main thread runs its own collectives meanwhile, and the
    ranks agree on done() with an all-reduce before publishing, as the trainer does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for step in (1, 2):
            pending = save_async(ckpt_dir, step, full_state(0, step)[0], keep_latest=1)
            while True:
                busy = torch.tensor([0.0 if pending.done() else 1.0])
                dist.all_reduce(busy)  # the training loop's own per-step collective
                if busy.item() == 0:
                    break
                time.sleep(0.01)
            assert pending.publish() == Path(ckpt_dir) / f"step-{step}"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_async_save_on_two_ranks_loads_in_one_process(tmp_path):
    mp.spawn(_async_on_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    got = loaded(tmp_path / "step-2")
    expected, _, _ = full_state(seed=0, step=2)
    assert got["marker"]["world_size"] == 2
    assert_same_tensors(got["model"], expected["model"])
    assert got["train_state"] == expected["train_state"]
    marker = json.loads((tmp_path / "step-2" / MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in (tmp_path / "step-2").iterdir()} - {MARKER}


class FolderState:
    """A NativeCheckpoint stand-in: it writes its own files, synchronously."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def save_native(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "value.txt").write_text(str(self.value))

    def load_native(self, path: Path) -> None:
        self.value = int((path / "value.txt").read_text())


def test_a_native_state_is_saved_synchronously_and_comes_back_published(tmp_path):
    with pytest.warns(UserWarning, match="saved synchronously"):
        pending = save_async(tmp_path, 2, {"train_state": {"step": 2}, "engine": FolderState(5)})
    assert pending.done() and (pending.path / MARKER).is_file()
    assert pending.publish() == tmp_path / "step-2"
    restored = FolderState()
    load(pending.path, {"train_state": {"step": 0}, "engine": restored})
    assert restored.value == 5
