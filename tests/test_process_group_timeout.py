"""``parallel.timeout_s`` reaches every process group the launcher makes, NCCL included:
``init_process_group`` is recorded instead of run, with CUDA faked, so the NCCL calls
are checked on a machine without a GPU."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from launcher import distributed


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, dict]]:
    """Process-group calls, recorded; this module's group state and the launch variables
    (``join_one_process_group`` sets them) are restored after."""
    recorded: list[tuple[str, dict]] = []
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(key, "0")  # remembers the value to restore, then unset
        monkeypatch.delenv(key)
    monkeypatch.setattr(distributed, "_made_a_group", False)
    monkeypatch.setattr(distributed, "_timeout", None)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: recorded.append((backend, kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: recorded.append(("new_group", kw)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    return recorded


def test_torchrun_ranks_get_an_nccl_group_with_the_timeout(calls, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.init_distributed(timeout_s=42.0)
    assert info.device == torch.device("cuda", 1)
    [(backend, kwargs)] = calls
    assert backend == "nccl"
    assert kwargs["timeout"] == timedelta(seconds=42)
    assert kwargs["device_id"] == torch.device("cuda", 1)
    distributed.new_cpu_group()  # the async checkpoints' gloo group: the same timeout
    assert calls[1] == ("new_group", {"backend": "gloo", "timeout": timedelta(seconds=42)})


def test_a_one_process_group_gets_the_timeout_too(calls):
    distributed.join_one_process_group(torch.device("cuda", 0), timeout_s=7.0)
    [(backend, kwargs)] = calls
    assert backend == "nccl"
    assert kwargs["timeout"] == timedelta(seconds=7)
    assert kwargs["world_size"] == 1
