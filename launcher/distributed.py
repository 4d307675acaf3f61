"""Process-group set-up from torchrun/srun environment variables, and the launcher's
collectives: with ``lotus_dist.comm`` (and the comms of ``lotus_dist.ddp`` and
``lotus_dist.fsdp``) the only code that calls ``torch.distributed`` collectives
(``tests/test_comm_boundary.py``)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lotus_dist.precision import upcast


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """This rank's GPU (cuda:local_rank, or cuda:0 under per-rank CUDA_VISIBLE_DEVICES)
    when CUDA is available, else cpu."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun (or srun through torchrun) describes, if any.

    A process torchrun started (TORCHELASTIC_RUN_ID set; slurm/train.sbatch starts
    torchrun too) gets a process group at any world size, 1 included, so that one GPU
    runs the same collectives as many; a plain process of world size 1 runs without one.
    The backend is nccl on CUDA and gloo on CPU. A collective that waits longer than
    ``timeout_s`` for a rank (stopped, dead, or stuck in a different collective) fails
    the job instead of hanging it, so torchrun or SLURM can restart it
    (``parallel.timeout_s``).
    """
    _refuse_bare_srun()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = _local_gpu(local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    global _made_a_group, _timeout
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    if (world_size > 1 or launched) and not dist.is_initialized():
        _timeout = timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=_timeout)
        _made_a_group = True
    return DistInfo(rank, world_size, local_rank, device)


def _refuse_bare_srun() -> None:
    """Stop ``srun -n N python -m launcher train`` (no torchrun) before it starts N
    independent single-process runs that share one run dir and overwrite each other."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            f"started as one of {tasks} srun tasks without torchrun (SLURM_STEP_NUM_TASKS="
            f"{tasks}, WORLD_SIZE unset): each task would train alone into the same run dir. "
            "Submit slurm/train.sbatch, which starts torchrun once per node, or run "
            "torchrun yourself in each srun task.")


def _local_gpu(local_rank: int) -> torch.device:
    """This rank's GPU: cuda:LOCAL_RANK when each rank sees every GPU of its node (torchrun's
    way), cuda:0 when CUDA_VISIBLE_DEVICES binds each rank to one GPU (SLURM's
    --gpus-per-task, --gpu-bind). Refused when the node runs more ranks than it has GPUs,
    which would otherwise fail later as an 'invalid device ordinal'."""
    count = torch.cuda.device_count()
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank}, but this process sees {count} GPU(s): more ranks per "
            f"node than GPUs. Start at most {count} rank(s) per node (torchrun "
            f"--nproc_per_node={count}; slurm/train.sbatch starts one per GPU of "
            "--gpus-per-node), or bind one GPU to each rank with CUDA_VISIBLE_DEVICES.")
    return torch.device("cuda", local_rank)


#: Set once ``init_distributed`` or ``join_one_process_group`` has created a process
#: group in this process, with this timeout (``new_cpu_group`` gives its group the same).
_made_a_group = False
_timeout: timedelta | None = None


def join_one_process_group(device: torch.device, timeout_s: float = 1800.0) -> None:
    """A process group of this process alone, for engines that always need one (fsdp,
    deepspeed) when the run was started without a launcher."""
    global _made_a_group, _timeout
    if dist.is_initialized():
        return
    for key in ("LOCAL_RANK", "RANK"):
        os.environ.setdefault(key, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    _timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None,
                            timeout=_timeout)
    _made_a_group = True


#: Set by the ``lotus-train`` executable (``launcher.__main__``): this process is the
#: command's own, so a training run may end it without interpreter shutdown even
#: without a process group.
_owns_process = False


def own_the_process() -> None:
    """Called by the executable's entry point only, never by in-process callers."""
    global _owns_process
    _owns_process = True


def start_cli_process() -> None:
    """A CLI command begins: no group of its own yet. An in-process caller (a test, a
    notebook) may have run an fsdp or deepspeed training before, whose one-process group
    set the flag; ``exit_process`` must not then end that caller's process."""
    global _made_a_group
    _made_a_group = False


def made_a_group() -> bool:
    """Whether ``init_distributed`` created a process group in this process."""
    return _made_a_group


def exit_process(code: int | str | None) -> None:
    """End the CLI process with ``code`` as ``sys.exit`` takes it (a message means 1);
    return instead on success where this process is neither the ``lotus-train``
    executable's own nor has made a process group (the in-process API and tests).

    After a process group, without interpreter shutdown: torch's DTensor caches keep a
    gloo group alive past ``destroy_process_group`` (as DeepSpeed's did), and its worker
    threads, freed in arbitrary order while the interpreter shuts down, can abort a run
    that has finished and written everything (SIGABRT, 'terminate called without an
    active exception'), so that torchrun reports a failed job. Every file the run writes
    is closed before this is called; the standard streams are flushed here."""
    if not (_made_a_group or _owns_process):
        if code:
            sys.exit(code)
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


@dataclass(frozen=True)
class StepVerdict:
    """What all ranks agreed on at the end of one step's backward."""

    loss: float
    """The global mean training loss."""
    nonfinite: bool
    """Some rank saw an inf/NaN loss or gradient norm: every rank skips the update."""
    stop: bool
    """Some rank received a stop signal: every rank checkpoints and stops at this step."""
    saving: bool
    """Some rank is still writing a background checkpoint: nobody publishes it yet."""


def agree_on_step(loss: torch.Tensor, *, nonfinite: bool, stop: bool,
                  saving: bool) -> StepVerdict:
    """One all-reduce per step that carries the loss and every flag that changes control
    flow, so no rank acts on a decision the others have not made.

    ``loss`` is this rank's mean loss (a device tensor); the flags are summed, so a flag
    raised on any rank is raised on all. The one host copy at the end is the step's only
    sync for these values.
    """
    value = upcast(loss.detach()).reshape(1)  # fp64 in an fp64 run: the loss is compared
    flags = torch.tensor([nonfinite, stop, saving], dtype=value.dtype, device=value.device)
    t = torch.cat([value, flags])
    world = 1
    if is_grouped():  # at world size 1 too: one GPU exercises the NCCL path
        world = dist.get_world_size()
        dist.all_reduce(t)
    loss_sum, n_nonfinite, n_stop, n_saving = t.tolist()
    # one rank's inf/NaN loss makes the sum non-finite on every rank
    return StepVerdict(loss=loss_sum / world,
                       nonfinite=n_nonfinite > 0 or not math.isfinite(loss_sum),
                       stop=n_stop > 0, saving=n_saving > 0)


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over ranks, into a copy (identity without a process group)."""
    if is_grouped():
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


def is_grouped() -> bool:
    """Whether this process is in a process group (of any size)."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Every rank has reached this point (nothing without a process group)."""
    if is_grouped():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a list of one without a process group)."""
    if not is_grouped():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_grouped():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def new_cpu_group() -> dist.ProcessGroup:
    """A new gloo group over all ranks (collective: every rank calls it together), with
    the timeout this module gave the default group (``parallel.timeout_s``), not torch's
    30-minute default."""
    return dist.new_group(backend="gloo", timeout=_timeout)


def teardown() -> None:
    """Destroy every process group and drop DeepSpeed's cached references to them. A
    group that outlives this call keeps gloo's threads running until interpreter exit,
    where freeing it can abort the process after a successful run (SIGABRT, 'terminate
    called without an active exception')."""
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()  # also releases deepspeed.utils.groups' caches
    else:
        dist.destroy_process_group()
