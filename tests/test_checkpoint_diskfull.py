"""A full disk during a save: a clear error, no leftover step-N.tmp, and a relaunch works.

Runs on a small tmpfs mounted for the test (needs root with mount permission, as in the
project's containers; skipped elsewhere).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from launcher import checkpoint
from launcher.checkpoint import CheckpointError, find_latest, load, save, save_async
from launcher.metrics import truncate_after

DISK_MB = 16


@pytest.fixture
def small_disk(tmp_path):
    """A DISK_MB MB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def state(seed: int = 0) -> dict:
    """6 MB of tensors: two checkpoints fit the disk, three do not."""
    torch.manual_seed(seed)
    return {"model": {"w": torch.randn(1_500_000)}, "train_state": {"step": seed}}


def fill(disk: Path, into: Path) -> None:
    """Write into ``into`` until the disk is full, as a save that crashed would have."""
    into.parent.mkdir(parents=True, exist_ok=True)
    with into.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def write_metrics(run_dir: Path, steps: range) -> Path:
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))
    return path


@pytest.mark.parametrize("save_fn", ["sync", "async"])
def test_full_disk_is_a_clear_error_and_leaves_no_scratch(small_disk, save_fn):
    ckpt = small_disk / "ckpt"
    save(ckpt, 1, state(1))
    latest = save(ckpt, 2, state(2))
    with pytest.raises(CheckpointError) as info:
        if save_fn == "sync":
            save(ckpt, 3, state(3))
        else:
            save_async(ckpt, 3, state(3)).publish()
    message = str(info.value)
    assert f"no space left on {small_disk}" in message
    assert "while saving checkpoint step-3" in message
    assert "needed about 6.0 MB" in message and " free)" in message
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2"]  # no .tmp left
    assert find_latest(ckpt) == latest
    target = state(0)
    load(latest, target)
    assert torch.equal(target["model"]["w"], state(2)["model"]["w"])


def test_relaunch_after_a_crash_on_a_full_disk(small_disk):
    """A save died on a full disk leaving step-2.tmp; the relaunch frees it first
    (remove_scratch), cuts its metrics back to the checkpoint, resumes, and saves."""
    run_dir, ckpt = small_disk, small_disk / "ckpt"
    first = save(ckpt, 1, state(1))
    metrics = write_metrics(run_dir, range(1, 3))
    fill(small_disk, ckpt / "step-2.tmp" / "__0_0.distcp")

    checkpoint.remove_scratch(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1"]
    truncate_after(metrics, 1)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1]
    load(first, state(0))
    save(ckpt, 2, state(2), keep_latest=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2"]


def test_truncating_metrics_needs_no_free_space(small_disk):
    """Resuming cuts metrics.jsonl back to the checkpoint's step: on a disk that is still
    full this must not need room for a second copy of the file."""
    metrics = write_metrics(small_disk, range(1, 2001))
    fill(small_disk, small_disk / "filler")
    truncate_after(metrics, 1000)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 1001))
