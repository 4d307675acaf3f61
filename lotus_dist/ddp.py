"""Low-rank DDP: replicated weights, and projected matrices communicate only R.

Averaging commutes with projection, mean_w(B^T G_w) = B^T mean_w(G_w), so all-reducing
each rank's R = project(G_w) gives exactly the R of single-process Lotus on the global
batch. As each gradient becomes final in backward (the last micro-batch), a hook
projects it with the shared basis (or takes the full gradient of a non-projected
parameter) and adds it to a bucket; full buckets are all-reduced asynchronously while
backward goes on. A matrix whose basis is due for a refresh is left out: its refresh
runs a distributed rSVD of the rank-mean gradient whose collectives are all sketches
((m or n) x (r+p)), then its R is reduced. Exact ``svd`` has to all-reduce the full
gradient, and is counted as such.

Every quantity behind a switch decision is computed from reduced (identical) values
and reduced once more per step, so all ranks take the same decisions.

Wiring (``launcher/engines/ddp_lowrank.py``)::

    comm = LowRankDDPComm(group)
    optimizer = LotusAdamW(groups, comm=comm)
    reducer = LowRankReducer(model, optimizer, comm)   # broadcasts weights, adds hooks
    # per step: reducer.boundary = last micro-batch; backward; reducer.finish();
    # optimizer.step(); comm.reset()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lotus_dist.comm import DataParallelComm
from lotus_dist.optim import LotusAdamW
from lotus_dist.precision import upcast, without_autocast
from lotus_dist.projection import RsvdComm, project


@dataclass
class _Bucket:
    """Tensors flattened into one buffer for one asynchronous all-reduce."""

    keys: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    numel: int = 0


class LowRankDDPComm(DataParallelComm):
    """The collectives of low-rank DDP, given to LotusAdamW at construction.

    The optimizer-facing half (``agree``, ``stats_reduce``, the refresh sketches) and the
    reducer-facing half (``broadcast_``, ``all_reduce_async``, ``deliver``): every
    ``torch.distributed`` call of low-rank DDP is here, on the group's device.

    Args:
        group: the data-parallel process group (the default group when None).
        check_consistency: after every step, all-gather checksums of all bases and stop
            with ``InconsistentBasisError`` naming a matrix the ranks disagree on.
    """

    exposes_full_grad = False

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 check_consistency: bool = False) -> None:
        super().__init__(group, check_consistency=check_consistency)
        self._ready: dict[torch.Tensor, torch.Tensor] = {}

    # ----------------------------------------------------------------- reducer side

    def broadcast_(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with rank 0's copy (the starting weights)."""
        src = dist.get_global_rank(self.group, 0) if self.group else 0
        dist.broadcast(t, src=src, group=self.group)

    def all_reduce_async(self, flat: torch.Tensor, kinds: list[tuple[str, int]]) -> dist.Work:
        """Start summing ``flat`` over the ranks; ``kinds`` says how many of its elements
        are of which kind, for the byte counts."""
        for kind, numel in kinds:
            self.bytes[kind] += numel * flat.element_size()
        return dist.all_reduce(flat, group=self.group, async_op=True)

    def deliver(self, p: torch.Tensor, mean_r: torch.Tensor) -> None:
        """Hand the optimizer the rank-mean R of ``p`` the reducer computed in backward."""
        self._ready[p] = mean_r

    def reset(self) -> None:
        """Drop this step's leftovers (a skipped step leaves its R unused)."""
        self._ready.clear()

    # ----------------------------------------------------------------- optimizer side

    def _mean(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        t = upcast(t).contiguous()
        self.bytes[kind] += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t.div_(self.world)

    def agree(self, flag: bool) -> bool:
        return self.all_ranks(flag)  # each rank judged only its own summand

    def stats_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        # the stats come from reduced values and agree already; averaging makes the
        # decisions bitwise identical even if a backend were not deterministic
        return self._mean(flat, "stats")

    def rsvd_comm(self, p: torch.Tensor, side: str) -> RsvdComm:
        return RsvdComm(sketch=lambda t: self._mean(t, "sketches"),
                        cosketch=lambda t: self._mean(t, "sketches"))

    def full_grad(self, p: torch.Tensor) -> torch.Tensor:
        return self._mean(p.grad, "full_gradients")

    def lowrank_grad(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        return self.lowrank_grads([(p, basis, side)])[0]

    def lowrank_grads(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]
                      ) -> list[torch.Tensor]:
        """R of every matrix: those the reducer delivered, and the rest (refreshed this
        step) projected and averaged in one bucket."""
        out: list[torch.Tensor | None] = [self._ready.pop(p, None) for p, _, _ in items]
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            local = [project(items[i][0].grad, items[i][1], items[i][2]) for i in missing]
            flat = self._mean(torch.cat([r.reshape(-1) for r in local]), "lowrank_gradients")
            for i, r, part in zip(missing, local, flat.split([r.numel() for r in local])):
                out[i] = part.view_as(r)
        return out


class LowRankReducer:
    """The gradient side of low-rank DDP (what DDP's reducer is to DDP), owned by the
    engine: weights broadcast from rank 0, then, in the last backward of each step, a
    hook per parameter that projects a final gradient with its current basis (or takes
    a non-projected one whole) into buckets all-reduced while backward goes on.

    Args:
        model: the replicated model.
        optimizer: the LotusAdamW built with ``comm``; read through its public API
            (``projected_params``, ``current_basis``).
        comm: the optimizer's ``LowRankDDPComm``.
        bucket_mb: size at which a bucket is sent (DDP's default is 25 MB).
    """

    def __init__(self, model: nn.Module, optimizer: LotusAdamW, comm: LowRankDDPComm,
                 bucket_mb: float = 25.0) -> None:
        if optimizer.comm is not comm:
            raise ValueError("LowRankReducer: build the optimizer with comm=<this "
                             "LowRankDDPComm>, so that it reads the R reduced here")
        self.optimizer, self.comm = optimizer, comm
        self.bucket_numel = int(bucket_mb * 2**20 / 4)
        self.projected = set(optimizer.projected_params())
        #: False on micro-batches that only accumulate: nothing is sent.
        self.boundary = True
        self._bucket = _Bucket()
        self._inflight: list[tuple[dist.Work, torch.Tensor, _Bucket]] = []
        for p in model.parameters():
            comm.broadcast_(p.data)
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @without_autocast
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """Project (or take whole) the final gradient of ``p`` and queue its all-reduce.
        A matrix due for a refresh is left for the optimizer's distributed rSVD."""
        if not self.boundary:
            return
        if p not in self.projected:
            self._add(p, "full_gradients", p.grad)
            return
        current = self.optimizer.current_basis(p)
        if current is not None:
            with torch.no_grad():
                self._add(p, "lowrank_gradients", project(p.grad, *current))

    def _add(self, p: torch.Tensor, kind: str, t: torch.Tensor) -> None:
        b = self._bucket
        b.keys.append((p, kind))
        b.tensors.append(t)
        b.numel += t.numel()
        if b.numel >= self.bucket_numel:
            self._send()

    def _send(self) -> None:
        b, self._bucket = self._bucket, _Bucket()
        if not b.tensors:
            return
        flat = torch.cat([upcast(t.reshape(-1)) for t in b.tensors])
        kinds = [(kind, t.numel()) for (_, kind), t in zip(b.keys, b.tensors)]
        self._inflight.append((self.comm.all_reduce_async(flat, kinds), flat, b))

    def finish(self) -> None:
        """After the last backward of a step: wait for every bucket and put the rank means
        where the optimizer reads them (p.grad for full gradients, R for the rest)."""
        self._send()
        for work, flat, bucket in self._inflight:
            work.wait()
            flat /= self.comm.world
            for (p, kind), t, part in zip(bucket.keys, bucket.tensors,
                                          flat.split([t.numel() for t in bucket.tensors])):
                mean = part.view_as(t)
                if kind == "full_gradients":
                    p.grad.copy_(mean)
                else:
                    self.comm.deliver(p, mean)
        self._inflight.clear()
