"""What LotusAdamW asks of the parallelism around it; the default is one process.

A distributed engine installs a subclass as ``optimizer.comm`` (low-rank DDP in
``lotus_dist.ddp``, FSDP in ``lotus_dist.fsdp``). The optimizer never calls
``torch.distributed`` itself: every collective it needs goes through these methods, so
the single-process algorithm and its distributed forms share one code path.
"""

from __future__ import annotations

import torch

from lotus_dist.projection import RsvdComm, project


class LocalComm:
    """One process: gradients are whole and final, nothing to reduce."""

    #: Whether ``p.grad`` is (a shard of) the gradient the optimizer consumes, so that
    #: norms of it reduce by ``stats_reduce``. False where each rank holds only its own
    #: summand (low-rank DDP): energy is then not reported and path_efficiency refused.
    exposes_full_grad: bool = True

    def agree(self, flag: bool) -> bool:
        """The same verdict on every rank (all ranks finite, say)."""
        return flag

    def stats_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """Reduce the partial sums behind the switch decisions (one call per step)."""
        return flat

    def rsvd_comm(self, p: torch.Tensor) -> RsvdComm:
        """Where the randomized SVD of ``p``'s gradient reduces."""
        return RsvdComm()

    def full_grad(self, p: torch.Tensor) -> torch.Tensor:
        """The whole gradient an exact SVD decomposes (a gather where it is sharded)."""
        return p.grad

    def lowrank_grad(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        """R, the projected gradient the optimizer consumes (reduced where needed)."""
        return project(p.grad, basis, side)
