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

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lotus_dist.comm import DataParallelComm
from lotus_dist.optim import LotusAdamW
from lotus_dist.precision import compute_dtype, upcast, without_autocast
from lotus_dist.projected_linear import ProjectionSite
from lotus_dist.projection import RsvdComm, matmul_precision, project, projection_side

_FULL, _LOWRANK = "full_gradients", "lowrank_gradients"
#: Every slot starts this many bytes (a multiple of) into its buffer, so it is aligned
#: like a fresh tensor (64 bytes on CPU; the kernels look at 16 at most): MKL's GEMM
#: rounds differently into a buffer that is not, and a slot must hold what ``project``
#: would have returned, bit for bit.
_ALIGN_BYTES = 256


@dataclass(eq=False)
class _Slot:
    """The fixed place of one parameter's contribution in its bucket: the full gradient
    of a non-projected parameter, or the R of a projected matrix."""

    p: torch.Tensor
    kind: str
    shape: tuple[int, ...]
    start: int
    #: ``flat[start:start + numel]`` shaped like ``shape``, made when the buffer is.
    view: torch.Tensor | None = None
    seen: bool = False  # its hook ran this step
    filled: bool = False  # and wrote the slot (a matrix due for a refresh does not)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(eq=False)
class _Bucket:
    """Consecutive slots of one flat buffer (one dtype, one device), allocated at first
    use and reused by every later step: hooks write their slots in place, and once every
    member's hook has run the filled ranges are all-reduced asynchronously."""

    dtype: torch.dtype
    device: torch.device
    slots: list[_Slot] = field(default_factory=list)
    numel: int = 0
    flat: torch.Tensor | None = None
    waiting: int = 0  # members whose hook has not run this step
    sent: bool = False

    def allocate(self) -> None:
        if self.flat is None:
            # zeros: the padding between slots is summed too, and stays 0
            self.flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            for s in self.slots:
                s.view = self.flat[s.start:s.start + s.numel].view(s.shape)

    def filled_runs(self) -> list[list[_Slot]]:
        """Maximal runs of consecutive filled slots: one run, the whole bucket, unless a
        matrix due for a refresh left a hole."""
        runs: list[list[_Slot]] = [[]]
        for s in self.slots:
            if s.filled:
                runs[-1].append(s)
            elif runs[-1]:
                runs.append([])
        return [run for run in runs if run]

    def reset(self) -> None:
        self.waiting, self.sent = len(self.slots), False
        for s in self.slots:
            s.seen = s.filled = False


def _project_into(grad: torch.Tensor, basis: torch.Tensor, side: str,
                  out: torch.Tensor) -> None:
    """``project(grad, basis, side)`` written into ``out``: the same matmul (and the same
    TF32 setting), without a new tensor."""
    g = upcast(grad)
    with matmul_precision("tf32"):
        if side == "left":
            torch.matmul(basis.T, g, out=out)
        else:
            torch.matmul(g, basis, out=out)


def _is_view_of(grad: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether ``grad`` is ``view`` (kept by ``zero_grad(set_to_none=False)`` and
    accumulated into in place)."""
    return (grad.data_ptr() == view.data_ptr() and grad.dtype == view.dtype
            and grad.shape == view.shape)


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

    def full_grad(self, p: torch.Tensor, owner: int = 0) -> torch.Tensor | None:
        """The rank-mean gradient on ``owner`` only, for its exact SVD (``svd_bases``): one
        reduce to that rank (m x n per refresh, counted as full_gradients), where an
        all-reduce would average it on every rank. It reduces a copy: every rank's own
        summand stays in ``p.grad`` for the R reduce that follows the refresh."""
        t = upcast(p.grad).clone()
        self.bytes["full_gradients"] += t.numel() * t.element_size()
        dist.reduce(t, dst=self._global_rank(owner), group=self.group)
        return t.div_(self.world) if owner == self.rank else None

    def lowrank_grad(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        return self.lowrank_grads([(p, basis, side)])[0]

    def backward_lowrank(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]
                         ) -> list[torch.Tensor]:
        """The rank means the reducer all-reduced from the projected backward's R."""
        return [self._ready.pop(p) for p, _, _ in items]

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

    The buckets are flat buffers in the compute dtype, allocated once (by the first
    step) and reused by every step. Every parameter with a gradient has a fixed slot in
    them, its R or its full gradient: in reverse registration order (about the order in
    which backward finishes gradients), ``bucket_mb`` per bucket and per (device, dtype),
    full gradients first within a bucket, each slot 256-byte aligned (the padding, under
    256 bytes a slot, travels with the bucket and is not counted in ``comm.bytes``). A
    hook writes its slot in place (R by ``torch.matmul(..., out=slot)``, a full gradient
    by ``copy_``), and a bucket is sent when all its members' hooks have run, in
    whatever order they ran. A matrix due for a refresh writes nothing and leaves a
    hole: only the runs of filled slots are sent (an extra collective per hole on a
    refresh step, never a new buffer).

    A full gradient of the buffer's dtype and device then becomes its slot (``p.grad``
    is a view of the bucket, as with DDP's ``gradient_as_bucket_view``), so the rank
    mean lands in ``p.grad`` without a copy back; other gradients (bf16 parameters) are
    copied back. ``zero_grad(set_to_none=True)`` drops the view, so each step's hook
    copies the accumulated gradient in once and re-points ``p.grad``; a gradient kept by
    ``set_to_none=False`` is still the view, accumulates in the bucket and is not copied.

    Args:
        model: the replicated model.
        optimizer: the LotusAdamW built with ``comm``; read through its public API
            (``projected_params``, ``current_basis``, ``param_groups``).
        comm: the optimizer's ``LowRankDDPComm``.
        bucket_mb: size at which a bucket is closed (DDP's default is 25 MB).
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
        self._buckets: list[_Bucket] = []
        self._slots: dict[torch.Tensor, tuple[_Bucket, _Slot]] = {}
        self._inflight: list[tuple[dist.Work, torch.Tensor, list[_Slot]]] = []
        params = list(model.parameters())
        for p in params:
            comm.broadcast_(p.data)
        self._layout([p for p in params if p.requires_grad])
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        for site in optimizer.projection_sites().values():
            site.on_ready = self._on_lowrank_ready

    def _layout(self, params: list[torch.Tensor]) -> None:
        """A slot for every parameter, in buckets closed at ``bucket_numel`` elements."""
        r_shape: dict[torch.Tensor, tuple[int, int]] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"] if "rank" in group else ():
                m, n = p.shape
                left = projection_side(p.shape, group["proj_type"]) == "left"
                r_shape[p] = (group["rank"], n) if left else (m, group["rank"])
        members: dict[tuple[torch.device, torch.dtype], list[tuple]] = {}
        numel: dict[tuple[torch.device, torch.dtype], int] = {}

        def close(key: tuple[torch.device, torch.dtype]) -> None:
            bucket = _Bucket(dtype=key[1], device=key[0])
            align = max(1, _ALIGN_BYTES // key[1].itemsize)
            for p, kind, shape in sorted(members.pop(key), key=lambda m: m[1] != _FULL):
                slot = _Slot(p, kind, shape, -(-bucket.numel // align) * align)
                bucket.slots.append(slot)
                bucket.numel = slot.start + slot.numel
                self._slots[p] = (bucket, slot)
            bucket.reset()
            self._buckets.append(bucket)

        for p in reversed(params):
            key = (p.device, compute_dtype(p))
            kind, shape = (_LOWRANK, r_shape[p]) if p in self.projected else (_FULL, tuple(p.shape))
            members.setdefault(key, []).append((p, kind, shape))
            numel[key] = numel.get(key, 0) + math.prod(shape)
            if numel[key] >= self.bucket_numel:
                close(key)
                numel[key] = 0
        for key in list(members):
            close(key)

    @without_autocast
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """Write the final gradient of ``p`` (or its R) into its slot, and send the bucket
        once all its members are in. A matrix due for a refresh is left for the
        optimizer's distributed rSVD."""
        if not self.boundary or p.grad is None:  # None: a projected backward gave R only
            return
        bucket, slot = self._slots[p]
        if slot.seen:
            raise RuntimeError("LowRankReducer: a gradient became final twice in one step; "
                               "call finish() after the last backward of each step")
        slot.seen = True
        bucket.waiting -= 1
        bucket.allocate()
        with torch.no_grad():
            if slot.kind == _FULL:
                if not _is_view_of(p.grad, slot.view):
                    slot.view.copy_(p.grad)
                    if p.grad.dtype == slot.view.dtype and p.grad.device == slot.view.device:
                        p.grad = slot.view  # the rank mean will land in p.grad
                slot.filled = True
            elif (current := self.optimizer.current_basis(p)) is not None:
                basis, side = current
                if basis.shape[1] != slot.shape[0 if side == "left" else 1]:
                    raise RuntimeError(f"LowRankReducer: a basis of width {basis.shape[1]} "
                                       f"for R of shape {slot.shape}; the group's rank changed")
                _project_into(p.grad, basis, side, slot.view)
                slot.filled = True
        if bucket.waiting == 0:
            self._send(bucket)

    def _on_lowrank_ready(self, site: ProjectionSite, r: torch.Tensor) -> None:
        """The projected backward's R of ``site.weight`` (its sum over this step's
        micro-batches): on the last one, write it into its slot like a projected hook."""
        if not self.boundary:
            return
        bucket, slot = self._slots[site.weight]
        if slot.seen:
            raise RuntimeError("LowRankReducer: a gradient became final twice in one step; "
                               "call finish() after the last backward of each step")
        slot.seen = slot.filled = True
        bucket.waiting -= 1
        bucket.allocate()
        slot.view.copy_(r)
        if bucket.waiting == 0:
            self._send(bucket)

    def _send(self, bucket: _Bucket) -> None:
        bucket.sent = True
        for run in bucket.filled_runs():
            part = bucket.flat[run[0].start:run[-1].start + run[-1].numel]
            kinds = [(s.kind, s.numel) for s in run]
            self._inflight.append((self.comm.all_reduce_async(part, kinds), part, run))

    def finish(self) -> None:
        """After the last backward of a step: send what is left (a bucket a member of
        which got no gradient), wait for every bucket and put the rank means where the
        optimizer reads them (p.grad for full gradients, R for the rest)."""
        for bucket in self._buckets:
            if not bucket.sent:
                self._send(bucket)
        for work, part, run in self._inflight:
            work.wait()
            part /= self.comm.world
            for s in run:
                if s.kind == _LOWRANK:
                    self.comm.deliver(s.p, s.view)
                elif not _is_view_of(s.p.grad, s.view):  # a gradient of another dtype
                    s.p.grad.copy_(s.view)
        self._inflight.clear()
        for bucket in self._buckets:
            bucket.reset()
