"""Checkpoints: exact round trips, atomic saves, pruning, and clear errors for bad ones."""

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter

from launcher import checkpoint
from launcher.checkpoint import (
    MARKER,
    CheckpointError,
    RNGState,
    find_latest,
    load,
    resolve_resume,
    save,
)
from lotus_dist.data import DataError


def make_model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model whose optimizer has stepped once, so its state has tensors."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01 * (seed + 1))
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def train_state(step: int) -> dict:
    return {"step": step, "tokens": 1234 * step, "loss_ema": 2.5, "name": "run",
            "history": [1, 2, 3][:step], "nested": {"refreshes": {"layer.0": step}}}


def full_state(seed: int, step: int) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = make_model_and_optimizer(seed)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "train_state": train_state(step)}
    return state, model, optimizer


def save_step(ckpt_dir, step: int, keep_latest: int = 0):
    return save(ckpt_dir, step, full_state(0, step)[0], keep_latest=keep_latest)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_round_trip_restores_model_optimizer_and_plain_values(tmp_path):
    saved, model, optimizer = full_state(seed=0, step=3)
    path = save(tmp_path / "ckpt", 3, saved)
    assert path == tmp_path / "ckpt" / "step-3"

    target, model2, optimizer2 = full_state(seed=1, step=0)
    marker = load(path, target)
    model2.load_state_dict(target["model"])
    optimizer2.load_state_dict(target["optimizer"])

    assert marker["step"] == 3 and marker["world_size"] == 1
    assert_same_tensors(model2.state_dict(), model.state_dict())
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert_same_tensors(optimizer.state[p], optimizer2.state[p2])
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert target["train_state"] == train_state(3)  # ints, floats, str, lists, nested dicts


class Counter:
    """A Stateful object: load calls its load_state_dict."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "weights": torch.full((2,), float(self.value))}

    def load_state_dict(self, state_dict: dict) -> None:
        self.value = state_dict["value"]
        assert torch.equal(state_dict["weights"], torch.full((2,), float(self.value)))


def test_stateful_values_are_loaded_through_load_state_dict(tmp_path):
    path = save(tmp_path, 1, {"dataloader": Counter(7)})
    restored = Counter(0)
    load(path, {"dataloader": restored})
    assert restored.value == 7


def test_rng_state_round_trip_continues_the_same_streams(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    path = save(tmp_path, 1, {"rng": RNGState()})
    expected = (random.random(), random.gauss(0, 1), torch.rand(3))

    random.seed(99)
    torch.manual_seed(99)
    load(path, {"rng": RNGState()})
    got = (random.random(), random.gauss(0, 1), torch.rand(3))
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2])


@contextmanager
def fake_cuda(count: int, first: int = 0) -> Iterator[list[list[torch.Tensor]]]:
    """torch.cuda with ``count`` GPUs, GPU i's generator state all bytes ``first + i``;
    yields the lists given to ``set_rng_state_all``, which restores nothing. Only around
    RNGState: DCP's writer takes a faked CUDA for real and fails."""
    restored: list[list[torch.Tensor]] = []
    states = [torch.full((16,), first + i, dtype=torch.uint8) for i in range(count)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: count > 0)
        patch.setattr(torch.cuda, "device_count", lambda: count)
        patch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states))
        patch.setattr(torch.cuda, "set_rng_state_all", restored.append)
        yield restored


def rng_checkpoint(tmp_path, gpus: int) -> Path:
    """A checkpoint of the RNG state of a process that sees ``gpus`` GPUs."""
    with fake_cuda(gpus):
        state = RNGState().state_dict()
    return save(tmp_path, 1, {"rng": state})


def test_rng_state_has_the_same_keys_with_and_without_cuda():
    """The strict load planner refuses differing keys: a GPU checkpoint must resume on a
    CPU host and the other way round."""
    with fake_cuda(2):
        with_cuda = RNGState().state_dict()
    with fake_cuda(0):
        without = RNGState().state_dict()
    assert with_cuda.keys() == without.keys()
    assert with_cuda["cuda_all"] == [[0] * 16, [1] * 16] and without["cuda_all"] == []


def test_cuda_rng_states_of_every_gpu_are_restored(tmp_path):
    path = rng_checkpoint(tmp_path, 2)
    with fake_cuda(2, first=7) as restored:
        load(path, {"rng": RNGState()})
    [states] = restored
    assert [s.dtype for s in states] == [torch.uint8] * 2
    assert torch.equal(torch.stack(states), torch.tensor([[0] * 16, [1] * 16]))


@pytest.mark.parametrize(("saved_on", "loaded_on"), [(2, 0), (0, 2), (2, 1)])
def test_cuda_rng_states_for_other_gpus_are_skipped_with_a_warning(
        tmp_path, saved_on, loaded_on):
    """GPU to CPU, CPU to GPU, or another GPU count: the run resumes, the CPU and Python
    generators exactly, and the CUDA ones keep their seeded state."""
    torch.manual_seed(3)
    path = rng_checkpoint(tmp_path, saved_on)
    expected = torch.rand(3)
    torch.manual_seed(4)
    with fake_cuda(loaded_on) as restored, \
            pytest.warns(UserWarning, match=f"for {saved_on} GPU.*sees {loaded_on}"):
        load(path, {"rng": RNGState()})
    assert torch.equal(torch.rand(3), expected)
    assert restored == []


def test_saved_checkpoint_has_marker_and_no_scratch_dirs(tmp_path):
    path = save_step(tmp_path, 5)
    assert (path / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]


def crash_in_dcp_write(monkeypatch):
    """The shards are written, then the process dies before DCP's metadata."""

    def finish(self, metadata, results):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(FileSystemWriter, "finish", finish)


def crash_before_publish(monkeypatch):
    """DCP finished and the marker is written, but the rename never happens."""

    def publish(tmp, final):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(checkpoint, "_publish", publish)


@pytest.mark.parametrize("crash", [crash_in_dcp_write, crash_before_publish])
def test_crash_during_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch, crash):
    first = save_step(tmp_path, 1)
    with monkeypatch.context() as patch:
        crash(patch)
        with pytest.raises((CheckpointError, RuntimeError), match="simulated crash"):
            save_step(tmp_path, 2)
    assert not (tmp_path / "step-2").exists()
    assert find_latest(tmp_path) == first
    load(first, full_state(1, 0)[0])  # still loads

    save_step(tmp_path, 3)  # the next save clears the crashed one's scratch directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-3"]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    save(tmp_path, 4, {"train_state": {"step": 4, "note": "first"}})
    path = save(tmp_path, 4, {"train_state": {"step": 4, "note": "second"}})
    target = {"train_state": {"step": 0, "note": ""}}
    load(path, target)
    assert target["train_state"]["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]


def test_keep_latest_prunes_older_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        save_step(tmp_path, step, keep_latest=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-30", "step-40"]


def test_keep_latest_never_prunes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30):
        save_step(tmp_path, step)
    # Resumed from step 10 and saving step 15, with newer checkpoints still around.
    save_step(tmp_path, 15, keep_latest=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-15", "step-30"]


def test_keep_latest_zero_keeps_everything(tmp_path):
    for step in (1, 2, 3):
        save_step(tmp_path, step, keep_latest=0)
    assert len(list(tmp_path.iterdir())) == 3


def test_find_latest_ignores_scratch_and_incomplete_dirs(tmp_path):
    assert find_latest(tmp_path / "missing") is None
    complete = save_step(tmp_path, 5)
    for name in ("step-9.tmp", "step-8.old", "step-7", "step-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-9.tmp" / MARKER).write_text("{}")
    assert find_latest(tmp_path) == complete


def test_find_latest_orders_steps_numerically(tmp_path):
    for step in (9, 10, 100):
        save_step(tmp_path, step)
    assert find_latest(tmp_path).name == "step-100"


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None
    latest = save_step(tmp_path, 2)
    assert resolve_resume(tmp_path, "auto") == latest
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, str(latest)) == latest
    with pytest.raises(CheckpointError, match=r"checkpoint\.resume='nowhere'"):
        resolve_resume(tmp_path, "nowhere")


def delete_shard(path):
    next(path.glob("*.distcp")).unlink()


def truncate_shard(path):
    shard = next(path.glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)


def garble_metadata(path):
    (path / ".metadata").write_bytes(b"not a pickle")


def garble_shard(path):
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)


def delete_marker(path):
    (path / MARKER).unlink()


@pytest.mark.parametrize("damage", [delete_shard, truncate_shard, garble_metadata, garble_shard,
                                    delete_marker])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, damage):
    path = save_step(tmp_path, 6)
    damage(path)
    with pytest.raises(CheckpointError) as info:
        load(path, full_state(1, 0)[0])
    message = str(info.value)
    assert str(path) in message
    assert "Delete it" in message and "checkpoint.resume" in message


def test_missing_checkpoint_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint directory at .*step-1"):
        load(tmp_path / "step-1", {})


def test_mismatched_keys_are_named(tmp_path):
    path = save(tmp_path, 1, {"train_state": {"step": 1, "tokens": 5}})
    with pytest.raises(CheckpointError) as info:
        load(path, {"train_state": {"step": 0, "epoch": 0}})
    message = str(info.value)
    assert "only in this run: train_state.epoch" in message
    assert "only in the checkpoint: train_state.tokens" in message


def test_unstepped_optimizer_cannot_silently_skip_its_state(tmp_path):
    saved, _, _ = full_state(seed=0, step=1)
    path = save(tmp_path, 1, saved)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    fresh = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"only in the checkpoint: optimizer\.state"):
        load(path, {"model": model.state_dict(), "optimizer": fresh.state_dict(),
                    "train_state": train_state(0)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_on_two_ranks(rank: int, port: int, ckpt_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for step in (1, 2):
            save(ckpt_dir, step, full_state(0, step)[0], keep_latest=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoint_saved_on_two_ranks_loads_in_one_process(tmp_path):
    mp.spawn(_save_on_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    target, _, _ = full_state(seed=1, step=0)
    marker = load(tmp_path / "step-2", target)
    expected, _, _ = full_state(seed=0, step=2)
    assert marker["world_size"] == 2
    assert_same_tensors(target["model"], expected["model"])
    assert target["train_state"] == expected["train_state"]


class BrokenData:
    """A data loader state whose load fails because of the data (not the checkpoint)."""

    def state_dict(self) -> dict:
        return {"position": 3}

    def load_state_dict(self, state_dict: dict) -> None:
        raise DataError("shard c4-train.00003.json.gz is unreadable at byte 123")


def test_data_error_while_loading_is_not_blamed_on_the_checkpoint(tmp_path):
    path = save(tmp_path, 1, {"dataloader": BrokenData()})
    with pytest.raises(DataError, match=r"c4-train\.00003") as info:
        load(path, {"dataloader": BrokenData()})
    assert not isinstance(info.value, CheckpointError)
    assert "Delete it" not in str(info.value)


def test_remove_scratch_deletes_crashed_saves_but_restores_a_lone_old_copy(tmp_path):
    keep = save_step(tmp_path, 1)
    lone = save_step(tmp_path, 4)
    os.replace(lone, tmp_path / "step-4.old")  # a re-save of step 4 died between renames
    for name in ("step-5.tmp", "step-1.old"):
        (tmp_path / name).mkdir()
    checkpoint.remove_scratch(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-4"]
    assert find_latest(tmp_path) == lone
    load(keep, full_state(1, 0)[0])
    load(lone, full_state(1, 0)[0])
