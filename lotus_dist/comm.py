"""What LotusAdamW asks of the parallelism around it; the default is one process.

This module, with the comms of ``lotus_dist.ddp`` and ``lotus_dist.fsdp`` (and, for the
launcher, ``launcher.distributed``), is the library's only caller of ``torch.distributed``
collectives (``tests/test_comm_boundary.py``): each creates the tensors it sends on its
group's device (``group_device``).

A distributed engine gives LotusAdamW a subclass at construction (``LotusAdamW(...,
comm=...)``: ``DataParallelComm`` for plain DDP, low-rank DDP in ``lotus_dist.ddp``,
FSDP in ``lotus_dist.fsdp``). The optimizer never calls ``torch.distributed`` itself:
every collective it needs goes through these methods, so the single-process algorithm
and its distributed forms share one code path.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lotus_dist.precision import compute_dtype, upcast
from lotus_dist.projection import RsvdComm, project, project_back, projected_dim, svd_basis

#: Kinds of bytes the comms count (``bytes``): what the optimizer's collectives carry.
BYTES_KINDS = ("lowrank_gradients", "full_gradients", "sketches", "stats", "bases")


class LocalComm:
    """One process: gradients are whole and final, nothing to reduce."""

    #: Whether ``p.grad`` is (a shard of) the gradient the optimizer consumes, so that
    #: norms of it reduce by ``stats_reduce``. False where each rank holds only its own
    #: summand (low-rank DDP): energy is then not reported and path_efficiency refused.
    exposes_full_grad: bool = True
    #: Debug (``parallel.check_consistency``): ``check_bases`` after every step.
    check_consistency: bool = False
    #: Ranks that share the work of a refresh burst (``svd_bases``), and this one's index.
    world: int = 1
    rank: int = 0

    def agree(self, flag: bool) -> bool:
        """The same verdict on every rank (all ranks finite, say)."""
        return flag

    def norm_sq_reduce(self, sq: torch.Tensor) -> torch.Tensor:
        """Sum squared norms' partial sums (a scalar or a vector of them, one per
        tensor) into the global ones (sharded tensors)."""
        return sq

    def stats_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """Reduce the partial sums behind the switch decisions (one call per step)."""
        return flat

    def store_basis(self, p: torch.Tensor, basis: torch.Tensor, side: str,
                    replicated: bool = False) -> torch.Tensor:
        """What the optimizer keeps of ``p``'s new (whole) basis: the basis itself here;
        under FSDP only this rank's rows, so that bases cost 1/W per rank too.
        ``replicated``: the basis is bitwise the same on every rank already (``svd_bases``
        broadcast it), so a comm that would otherwise send one rank's copy need not."""
        return basis

    def full_basis(self, p: torch.Tensor, stored: torch.Tensor, side: str) -> torch.Tensor:
        """The whole basis from what ``store_basis`` kept (an all-gather where sharded)."""
        return stored

    def rsvd_comm(self, p: torch.Tensor, side: str) -> RsvdComm:
        """Where the randomized SVD of ``p``'s gradient (projected on ``side``) reduces."""
        return RsvdComm()

    def full_grad(self, p: torch.Tensor, owner: int = 0) -> torch.Tensor | None:
        """The whole gradient an exact SVD decomposes, on rank ``owner`` of the group and
        None on the others (a gather or a reduce to it where the gradient is sharded or
        per rank)."""
        return p.grad

    def svd_bases(self, items: list[tuple[torch.Tensor, int, str]]) -> list[torch.Tensor]:
        """The exact top-``rank`` bases (``svd_basis``) of the (p, rank, side) due for an
        SVD in one step, whole on every rank; one process computes them all."""
        return [svd_basis(self.full_grad(p), rank, side) for p, rank, side in items]

    def lowrank_grad(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        """R, the projected gradient the optimizer consumes (reduced where needed)."""
        return project(p.grad, basis, side)

    def lowrank_grads(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]
                      ) -> list[torch.Tensor]:
        """``lowrank_grad`` of every (p, basis, side) of a step; comms that reduce R
        override it to reduce them all in one bucket."""
        return [self.lowrank_grad(p, basis, side) for p, basis, side in items]

    def backward_reduce(self, p: torch.Tensor, side: str
                        ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the projected backward of ``p`` applies to each micro-batch's R before
        summing it (``ProjectionSite.reduce``): nothing here, R is summed whole."""
        return None

    def backward_lowrank(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]
                         ) -> list[torch.Tensor]:
        """The R the optimizer consumes for each (p, R, side) the projected backward summed
        on this rank (``optim.projected_backward``): that R itself in one process."""
        return [r for _, r, _ in items]

    def back_basis(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        """The basis rows that map R back onto this rank's part of ``p`` (all of them
        here; under FSDP the whole basis or this shard's rows, as the layout needs)."""
        return basis

    def project_back(self, p: torch.Tensor, low_rank: torch.Tensor, basis: torch.Tensor,
                     side: str) -> torch.Tensor:
        """The update of this rank's part of ``p`` (its local shard where ``p`` is sharded)."""
        return project_back(local_view(low_rank), self.back_basis(p, basis, side), side)

    def check_bases(self, bases: list[tuple[str, torch.Tensor, int]]) -> None:
        """Raise ``InconsistentBasisError`` where ranks hold different (name, basis, refresh
        count); one process cannot disagree with itself."""


class DataParallelComm(LocalComm):
    """The base of the multi-rank comms: a process group over which every rank holds
    every basis whole once it is computed (FSDP then keeps only its rows), so
    ``check_consistency`` can compare them in one all-gather. Every rank computes every
    rSVD (from reduced sketches); an exact SVD runs on one owner, which broadcasts it
    (``svd_bases``).

    On its own it serves plain DDP, where ranks hold identical averaged gradients and
    compute the same bases; it averages their switch statistics and keeps rank 0's bases
    so that replicas cannot drift apart.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 check_consistency: bool = False) -> None:
        self.group = group
        #: Where tensors this comm creates for a collective live (NCCL rejects CPU ones).
        self.device = group_device(group)
        self.check_consistency = check_consistency
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        #: Bytes put into collectives, by kind (``BYTES_KINDS``), since construction.
        self.bytes: Counter[str] = Counter()

    def stats_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """Average the switch statistics. Replicas computed them from the same averaged
        gradients, but kernels can differ in the last bits between GPU models (or be
        nondeterministic); averaging makes every rank decide from the same numbers."""
        self.bytes["stats"] += flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=self.group)
        return flat.div_(self.world)

    def _global_rank(self, rank: int) -> int:
        """The global rank of this group's rank ``rank`` (collectives name ranks globally)."""
        return dist.get_global_rank(self.group, rank) if self.group else rank

    def store_basis(self, p: torch.Tensor, basis: torch.Tensor, side: str,
                    replicated: bool = False) -> torch.Tensor:
        """Every rank keeps rank 0's basis (d x r per refresh), for the same reason; one
        ``svd_bases`` already broadcast is kept as it is (no second copy on the wire)."""
        if replicated:
            return basis
        self.bytes["bases"] += basis.numel() * basis.element_size()
        basis = basis.contiguous()
        dist.broadcast(basis, src=self._global_rank(0), group=self.group)
        return basis

    def full_grad(self, p: torch.Tensor, owner: int = 0) -> torch.Tensor | None:
        """Replicas hold the same averaged gradient: the owner takes its own, nothing moves."""
        return p.grad if owner == self.rank else None

    def svd_bases(self, items: list[tuple[torch.Tensor, int, str]]) -> list[torch.Tensor]:
        """Each rank computes the SVDs of its share of ``items`` (``svd_owners``), then
        each owner broadcasts its bases in one flat tensor: one share of the SVDs (seconds
        each at 7b) per rank instead of all of them on every rank, and W broadcasts per
        burst. Gradients reach their owners (``full_grad``) in turns of at most one
        matrix per owner, all of a turn's transfers before its SVDs: the owners of a turn
        decompose side by side, and a rank holds one whole gradient at a time."""
        owned = svd_owners([_svd_cost(p.shape) for p, _, _ in items], self.world)
        mine: dict[int, torch.Tensor] = {}
        for turn in range(max(map(len, owned))):
            grads = {}
            for owner, share in enumerate(owned):  # the same order on every rank
                if turn < len(share):
                    grad = self.full_grad(items[share[turn]][0], owner)
                    if grad is not None:
                        grads[share[turn]] = grad
            for i, grad in grads.items():  # this rank's matrix of the turn
                mine[i] = svd_basis(grad, items[i][1], items[i][2])
            del grads  # its whole gradient, before the next turn brings one
        out: list[torch.Tensor | None] = [None] * len(items)
        for owner, share in enumerate(owned):
            if share:
                for i, basis in zip(share, self._broadcast_bases(owner, share, items, mine)):
                    out[i] = basis
        return out

    def _broadcast_bases(self, owner: int, share: list[int],
                         items: list[tuple[torch.Tensor, int, str]],
                         mine: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The bases of ``share`` (indices into ``items``) that ``owner`` computed, sent
        from it to every rank in one flat broadcast (counted as ``bases``)."""
        grads = [local_view(items[i][0].grad) for i in share]
        shapes = [(projected_dim(items[i][0].shape, items[i][2]), items[i][1]) for i in share]
        dtypes = [compute_dtype(g) for g in grads]
        dtype = functools.reduce(torch.promote_types, dtypes)
        if owner == self.rank:
            flat = torch.cat([mine[i].reshape(-1) for i in share]).to(self.device, dtype)
        else:
            flat = torch.empty(sum(d * r for d, r in shapes), dtype=dtype, device=self.device)
        self.bytes["bases"] += flat.numel() * flat.element_size()
        dist.broadcast(flat, src=self._global_rank(owner), group=self.group)
        parts = flat.split([d * r for d, r in shapes])
        # copies: a stored basis must not pin the whole flat
        return [part.view(shape).to(g.device, dt, copy=True)
                for part, shape, g, dt in zip(parts, shapes, grads, dtypes)]

    def all_ranks(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank (one MIN all-reduce)."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def check_bases(self, bases: list[tuple[str, torch.Tensor, int]]) -> None:
        assert_bases_agree(bases, self.group)


def svd_owners(costs: list[float], world: int) -> list[list[int]]:
    """The indices of the items each of ``world`` ranks owns: largest cost first onto the
    least loaded rank (ties to the lower rank), so each rank's list runs largest first
    and the k-th items of all ranks are alike. A pure function of its arguments: every
    rank computes the same owners without communicating. (ZeRO-1/2's matrix ownership,
    ``lotus_dist.deepspeed.balanced_owners``, starts from it too.)"""
    owned: list[list[int]] = [[] for _ in range(world)]
    loads = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(world), key=lambda k: (loads[k], k))
        owned[k].append(i)
        loads[k] += costs[i]
    return owned


def _svd_cost(shape: tuple[int, int] | torch.Size) -> float:
    """The flops of a full SVD of an m x n matrix, up to a constant: m n min(m, n)."""
    m, n = shape
    return float(m * n * min(m, n))


def sum_over_ranks(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` in place (``t`` must be on its device)."""
    dist.all_reduce(t, group=group)
    return t


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Every rank of ``group`` has reached this point."""
    dist.barrier(group=group)


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device collectives on ``group`` take their tensors on: the current CUDA device
    where the group has NCCL (alone or as ``cpu:gloo,cuda:nccl``), else the CPU."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------- sharded tensors


def local_view(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (sharing its storage, so
    in-place updates reach the DTensor), else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def partial_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """This rank's share of <a, b> (in the compute dtype): summed over ranks it is the
    global value.

    ``a`` and ``b`` are plain tensors or DTensors laid out alike. A sharded pair
    contributes its local part; a pair replicated over a mesh dimension counts on that
    dimension's first rank only, so a replicated quantity is not summed once per rank.
    """
    # a dot product of flat views: no full-size product tensor (7B gradients are large)
    dot = torch.dot(upcast(local_view(a)).reshape(-1), upcast(local_view(b)).reshape(-1))
    if isinstance(a, DTensor) and not _owns_replica(a):
        return torch.zeros_like(dot)
    return dot


def _owns_replica(t: DTensor) -> bool:
    coordinate = t.device_mesh.get_coordinate() or []
    return all(c == 0 for c, placement in zip(coordinate, t.placements)
               if isinstance(placement, Replicate))


# --------------------------------------------------------------------- consistency check


class InconsistentBasisError(RuntimeError):
    """Ranks hold different projection bases (``parallel.check_consistency``)."""


def assert_bases_agree(bases: list[tuple[str, torch.Tensor, int]],
                       group: dist.ProcessGroup | None = None, rtol: float = 1e-5) -> None:
    """All-gather checksums of every (name, basis, refresh count) and raise
    ``InconsistentBasisError`` on every rank, naming the first matrix whose checksum
    differs between ranks.

    The checksums are the sum of the basis and two sums weighted by fixed ramps, one over
    its rows and one over its columns (which a permutation of either or a sign flip
    changes), computed from the row and column sums without any full-size temporary,
    plus the refresh count, so a rank that refreshed at another step is caught too. Ranks
    compute bases from identical reduced inputs, so ``rtol`` only absorbs nondeterministic
    kernels. The gathered table is compared on the host after one copy. Collective:
    every rank calls it with the same matrices in the same order.
    """
    rows = []
    for _name, basis, _count in bases:
        b = basis.detach()
        by_row, by_col = b.sum(dim=1, dtype=torch.float64), b.sum(dim=0, dtype=torch.float64)
        row_ramp = torch.linspace(1.0, 2.0, b.shape[0], dtype=torch.float64, device=b.device)
        col_ramp = torch.linspace(1.0, 2.0, b.shape[1], dtype=torch.float64, device=b.device)
        rows.append(torch.stack([by_row.sum(), torch.dot(by_row, row_ramp),
                                 torch.dot(by_col, col_ramp)]))
    device = group_device(group)
    sums = (torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)).to(device)
    counts = torch.tensor([float(c) for _, _, c in bases], dtype=torch.float64)
    # columns: sum, row-ramp sum, refresh count, column-ramp sum
    mine = torch.cat([sums[:, :2], counts.reshape(-1, 1).to(device), sums[:, 2:]], dim=1)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    gathered = torch.stack(parts).cpu()  # one copy to the host for every comparison
    reference = gathered[0]
    for i, (name, _basis, _count) in enumerate(bases):
        tol = rtol * (1.0 + reference[i].abs())
        bad = [r for r, sums in enumerate(gathered) if ((sums[i] - reference[i]).abs() > tol).any()]
        if bad:
            detail = "; ".join(f"rank {r}: refresh {int(g[i, 2])}, checksum {g[i, 1]:.9g}"
                               for r, g in enumerate(gathered))
            raise InconsistentBasisError(
                f"parallel.check_consistency: ranks disagree on the projection basis of {name} "
                f"(rank(s) {bad} differ from rank 0: {detail}); their subspace decisions or "
                "reductions have diverged")
