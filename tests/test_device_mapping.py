"""``init_distributed`` maps each rank to its GPU and refuses launches that cannot work:
more ranks per node than GPUs, and a bare multi-task ``srun`` without torchrun. CUDA and
the process group are faked, so this runs on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from launcher import distributed

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID",
               "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def gpus(monkeypatch) -> list[torch.device]:
    """Fake CUDA with 8 GPUs (tests change the count) and no launch variables; returns the
    devices ``set_device`` was given."""
    chosen: list[torch.device] = []
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_made_a_group", False)
    monkeypatch.setattr(distributed, "_timeout", None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def torchrun_rank(monkeypatch, local_rank: int, world_size: int = 16) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_each_rank_takes_the_gpu_of_its_local_rank(gpus, monkeypatch):
    torchrun_rank(monkeypatch, 5)
    assert distributed.init_distributed().device == torch.device("cuda", 5)
    assert gpus == [torch.device("cuda", 5)]


def test_more_ranks_per_node_than_gpus_is_refused_with_the_numbers(gpus, monkeypatch):
    torchrun_rank(monkeypatch, 9)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=9.*sees 8 GPU.*--nproc_per_node=8"):
        distributed.init_distributed()
    assert gpus == []


def test_one_visible_gpu_per_rank_is_cuda_0(gpus, monkeypatch):
    """SLURM's --gpus-per-task gives each rank CUDA_VISIBLE_DEVICES of its own GPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    torchrun_rank(monkeypatch, 3)
    assert distributed.init_distributed().device == torch.device("cuda", 0)


def test_one_gpu_without_binding_is_not_shared_by_two_ranks(gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    torchrun_rank(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="more ranks per node than GPUs"):
        distributed.init_distributed()


def test_bare_srun_without_torchrun_is_refused(gpus, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match=r"4 srun tasks without torchrun.*slurm/train\.sbatch"):
        distributed.init_distributed()
    assert gpus == []


def test_torchrun_under_srun_and_a_one_task_step_start(gpus, monkeypatch):
    """slurm/train.sbatch: one srun task per node, each running torchrun (WORLD_SIZE set);
    and a process in an allocation of many tasks but not in a multi-task step."""
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    torchrun_rank(monkeypatch, 0)
    assert distributed.init_distributed().device == torch.device("cuda", 0)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.init_distributed().world_size == 1
