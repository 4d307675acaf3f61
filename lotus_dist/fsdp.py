"""Lotus under FSDP2: every rank updates its shard of each matrix, with only low-rank traffic.

A projected weight G (m x n) keeps one dimension and compresses the other (``std``:
right projection R = G Q keeps the m rows, left projection R = P^T G keeps the n
columns). FSDP2 shards it along the dimension it keeps where it can, and then:

* the projection of a local shard is the matching shard of R (rows of G Q, columns of
  P^T G): no communication, and R, Adam's moments and the update are sharded like G;
* the refresh is a randomized SVD of a column-sharded A (A = G or G^T, see
  ``RsvdComm``): (d x l) sketch all-reduces plus (l x l) fp64 Gram all-reduces (one per
  power iteration, one for the final small eigenproblem), each one collective for a
  whole batch of same-shape matrices refreshing together (``rsvd_bases``);
* an exact SVD (``projection="svd"``) runs on one owner per matrix, which alone receives
  the whole gradient (a gather) and broadcasts the basis (``DataParallelComm.svd_bases``).

FSDP2 (torch 2.13) shards unevenly only on dim 0, so a left-projected matrix whose n the
world size does not divide is sharded on dim 0, the dimension it compresses. Each rank
then holds G_k (rows of G) and the matching rows P_k of the basis (the rows it stores), and
R = sum_k P_k^T G_k is all-reduced (r x n, still low-rank); R and the moments are
replicated, and the update P_k N is again this rank's rows. Its refresh is an rSVD of a
row-sharded A: sketches are all-gathered by rows and co-sketches summed.

Optimizer state that lives in R's space (moments, the displacement's R_0) is a DTensor
laid out like R (``Shard`` or ``Replicate`` on the FSDP mesh), so DCP saves it sharded
and reshards it on load at any world size. Bases are sharded by rows too
(``FSDPComm.store_basis``, ``Shard(0)``), so they cost 1/W per rank like everything else:
a matrix sharded along its kept dimension all-gathers its whole basis when it projects
and again when it updates, one matrix at a time (counted as ``bases``: d x r per use,
about the size of R), and a dim-0 fallback matrix only ever needs the rows it holds.

Every rank takes the same switch decisions: the policies' statistics are partial sums
over local shards (``partial_dot`` counts a replicated R once, not once per rank), and
the optimizer sums all matrices' statistics in one all-reduce per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lotus_dist.comm import DataParallelComm
from lotus_dist.param_groups import lotus_param_groups
from lotus_dist.precision import upcast
from lotus_dist.projection import RsvdComm, project, projection_side


def kept_dim(side: str) -> int:
    """The weight dimension a projection keeps: rows for right (G Q), columns for left."""
    return 0 if side == "right" else 1


def lotus_shard_dim(shape: tuple[int, int] | torch.Size, side: str, world_size: int) -> int:
    """The dimension FSDP shards a projected weight on: the one it keeps, except that
    FSDP2 refuses uneven sharding on dim 1, where dim 0 (the compressed one) is used."""
    dim = kept_dim(side)
    return dim if dim == 0 or shape[dim] % world_size == 0 else 0


def projected_sides(model: nn.Module, rank: int, target_modules: list[str] | tuple[str, ...],
                    proj_type: str) -> dict[torch.Tensor, str]:
    """Projection side of every weight ``lotus_param_groups`` projects, keyed by parameter.

    Works on a meta-device model, so placements are chosen before anything is allocated.
    """
    groups = lotus_param_groups(model, rank, target_modules)
    return {p: projection_side(p.shape, proj_type) for _, p in groups[-1]["params"]}


def lotus_shard_placement(sides: dict[torch.Tensor, str], world_size: int):
    """A ``fully_shard(shard_placement_fn=...)`` that shards each projected weight along
    the dimension it keeps (``lotus_shard_dim``) and everything else on dim 0."""

    def placement(param: nn.Parameter) -> Shard | None:
        side = sides.get(param)
        return None if side is None else Shard(lotus_shard_dim(param.shape, side, world_size))

    return placement


@dataclass(frozen=True)
class ShardLayout:
    """How one projected weight is split: this rank holds [start, stop) along ``dim``."""

    side: str
    dim: int
    start: int
    stop: int

    @property
    def kept(self) -> bool:
        """Sharded along the kept dimension: local projection, R sharded like G."""
        return self.dim == kept_dim(self.side)

    @property
    def own(self) -> slice:
        return slice(self.start, self.stop)


def shard_layout(p: DTensor, side: str) -> ShardLayout:
    """This rank's range of ``p`` along its shard dimension.

    FSDP2 and DTensor split a dimension of size s like ``torch.chunk``: blocks of
    ceil(s / W) rows, the last ranks short or empty, so the offset follows from the rank.
    """
    (placement,) = p.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"expected a Shard placement on a 1-D mesh, got {p.placements}")
    dim, size = placement.dim, p.shape[placement.dim]
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    start = min(rank * math.ceil(size / world), size)
    stop = start + p.to_local().shape[dim]
    if stop > size:
        raise AssertionError(f"local shard [{start}, {stop}) exceeds dim {dim} of {p.shape}")
    return ShardLayout(side, dim, start, stop)


class FSDPComm(DataParallelComm):
    """The collectives of Lotus on FSDP2-sharded weights, given to LotusAdamW at
    construction (``LotusAdamW(groups, comm=FSDPComm(mesh))``).

    Args:
        mesh: the 1-D data-parallel mesh FSDP shards over.
        check_consistency: after every step, all-gather checksums of all bases and stop
            with ``InconsistentBasisError`` naming a matrix the ranks disagree on.
        shard_bases: keep each rank's rows of every basis (``store_basis``); False keeps
            them whole on every rank, trading 1/W basis memory for no basis gathers.
        shard_lowrank_accumulation: with the projected backward, reduce-scatter each
            micro-batch's R of a matrix sharded along its kept dimension, so a rank sums
            only its shard (``parallel.fsdp_grad_accumulation=sharded``); False sums
            whole R on every rank and all-reduces once per step.

    ``bytes`` counts what this class puts into collectives, by kind, for the engine's
    per-step accounting (FSDP's own all-gathers and reduce-scatters are not in it).
    """

    exposes_full_grad = True

    def __init__(self, mesh: DeviceMesh, *, check_consistency: bool = False,
                 shard_bases: bool = True, shard_lowrank_accumulation: bool = True) -> None:
        if mesh.ndim != 1:
            raise ValueError(f"FSDPComm needs a 1-D data-parallel mesh, got {mesh.ndim}-D")
        super().__init__(mesh.get_group(), check_consistency=check_consistency)
        self.mesh = mesh
        self.shard_bases = shard_bases
        self.shard_lowrank_accumulation = shard_lowrank_accumulation
        self._layouts: dict[torch.Tensor, ShardLayout] = {}

    def layout(self, p: torch.Tensor, side: str) -> ShardLayout:
        """How ``p`` (projected on ``side``) is split over the ranks; computed once."""
        if p not in self._layouts:
            self._layouts[p] = shard_layout(p, side)
        return self._layouts[p]

    # ----------------------------------------------------------------- collectives

    def _sum(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        t = t.contiguous()
        self.bytes[kind] += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t

    def _gather_rows(self, t: torch.Tensor, rows: int, kind: str) -> torch.Tensor:
        """Stack every rank's rows (torch.chunk layout) of each sketch of the batch ``t``
        (b, local rows, l) into the whole (b, ``rows``, l), in one all-gather.

        Shards are padded to one chunk so that all ranks send equal sizes; with the
        chunk layout, row i of the padded stack is row i of the whole for i < rows.
        """
        chunk = math.ceil(rows / self.world)
        padded = t.new_zeros(t.shape[0], chunk, t.shape[2])
        padded[:, : t.shape[1]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.bytes[kind] += t.shape[0] * rows * t.shape[2] * t.element_size()
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts, dim=1)[:, :rows]

    def agree(self, flag: bool) -> bool:
        return self.all_ranks(flag)  # each rank judged only its own shard

    def norm_sq_reduce(self, sq: torch.Tensor) -> torch.Tensor:
        return self._sum(upcast(sq).reshape(-1), "stats").reshape(sq.shape)

    def stats_reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """One all-reduce per step of every matrix's partial sums: all ranks then hold
        the same numbers and take the same switch decisions."""
        return self._sum(flat, "stats")

    # ----------------------------------------------------------------- the Lotus hooks

    def rsvd_comm(self, p: torch.Tensor, side: str) -> RsvdComm:
        lay = self.layout(p, side)
        m, n = p.shape
        shape = (m, n) if lay.side == "left" else (n, m)  # (d, k) of A = G or G^T
        if lay.kept:  # this rank holds columns of A
            return RsvdComm(sketch=lambda t: self._sum(t, "sketches"),
                            gram=lambda t: self._sum(t, "sketches"),
                            shape=shape, columns=lay.own)
        return RsvdComm(sketch=lambda t: self._gather_rows(t, shape[0], "sketches"),
                        cosketch=lambda t: self._sum(t, "sketches"),
                        shape=shape, rows=lay.own)

    def full_grad(self, p: torch.Tensor, owner: int = 0) -> torch.Tensor | None:
        """``projection="svd"`` decomposes the whole gradient on its owner only
        (``svd_bases``): one gather of the shards, padded to a chunk, to that rank (m x n
        per refresh, counted as full_gradients), where an all-gather would put it on
        every rank; rsvd never moves a gradient."""
        local = p.grad.to_local()
        (placement,) = p.grad.placements
        dim, size = placement.dim, p.shape[placement.dim]
        shape = list(local.shape)
        shape[dim] = math.ceil(size / self.world)
        padded = local.new_zeros(shape)
        padded.narrow(dim, 0, local.shape[dim]).copy_(local)
        mine = owner == self.rank
        parts = [torch.empty_like(padded) for _ in range(self.world)] if mine else None
        self.bytes["full_gradients"] += p.numel() * local.element_size()
        dist.gather(padded, parts, dst=self._global_rank(owner), group=self.group)
        return None if parts is None else torch.cat(parts, dim).narrow(dim, 0, size)

    def store_basis(self, p: torch.Tensor, basis: torch.Tensor, side: str,
                    replicated: bool = False) -> DTensor:
        """This rank's rows of the (d x r) basis (torch.chunk layout, as FSDP shards), so
        per-rank basis memory falls as 1/W. A matrix sharded along the dimension its
        projection keeps gathers the whole basis when it projects or updates (one at a
        time, freed after use, counted as ``bases``); a dim-0 fallback matrix only ever
        needs its own rows, which are exactly this shard."""
        if not self.shard_bases:  # whole on every rank: no gathers, W times the memory
            return basis
        d, r = basis.shape
        chunk = math.ceil(d / self.world)
        start = min(self.mesh.get_local_rank() * chunk, d)
        local = basis[start:min(start + chunk, d)].contiguous()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size((d, r)), stride=(r, 1))

    def full_basis(self, p: torch.Tensor, stored: torch.Tensor, side: str) -> torch.Tensor:
        if not isinstance(stored, DTensor):  # a replicated basis (path efficiency's sketch)
            return stored
        self.bytes["bases"] += stored.numel() * stored.element_size()
        return stored.full_tensor()

    def _own_rows(self, p: torch.Tensor, stored: torch.Tensor, lay: ShardLayout) -> torch.Tensor:
        """The rows of the basis this rank's dim-0 shard of ``p`` meets."""
        return stored.to_local() if isinstance(stored, DTensor) else stored[lay.own]

    def lowrank_grad(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> DTensor:
        return self.lowrank_grads([(p, basis, side)])[0]

    def _kept_lowrank_grad(self, p: torch.Tensor, basis: torch.Tensor, side: str,
                           lay: ShardLayout) -> DTensor:
        """R of a matrix sharded along its kept dimension: this shard's projection is
        this rank's shard of R, with no communication."""
        r = project(p.grad.to_local(), self.full_basis(p, basis, side), side)
        rank = basis.shape[1]
        shape = (rank, p.shape[1]) if side == "left" else (p.shape[0], rank)
        return DTensor.from_local(r, self.mesh, [Shard(lay.dim)], run_check=False,
                                  shape=torch.Size(shape), stride=(shape[1], 1))

    def backward_reduce(self, p: torch.Tensor, side: str
                        ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sharded accumulation: each micro-batch's R of a matrix sharded along its kept
        dimension is reduce-scattered at once to this rank's shard of the rank mean (R
        bytes per micro-batch, counted as lowrank_gradients), so no rank holds every
        matrix's whole R. A dim-0 fallback matrix's R is replicated anyway: it is summed
        whole and all-reduced with the rest in ``backward_lowrank``."""
        lay = self.layout(p, side)
        if not (lay.kept and self.shard_lowrank_accumulation):
            return None
        return lambda r: self._reduce_scatter_mean(r, lay.dim)

    def _reduce_scatter_mean(self, r: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk (torch.chunk layout) along ``dim`` of the rank mean of ``r``:
        one reduce-scatter of ``r`` padded to whole chunks."""
        t = r.movedim(dim, 0)
        size = t.shape[0]
        chunk = math.ceil(size / self.world)
        padded = t.new_zeros((chunk * self.world, *t.shape[1:]))
        padded[:size] = t
        out = t.new_empty((chunk, *t.shape[1:]))
        self.bytes["lowrank_gradients"] += r.numel() * r.element_size()
        dist.reduce_scatter_tensor(out, padded, group=self.group)
        start = min(self.rank * chunk, size)
        own = min(start + chunk, size) - start
        return out[:own].div_(self.world).movedim(0, dim).contiguous()

    def backward_lowrank(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]
                         ) -> list[DTensor]:
        """R of the projected backward, laid out as ``lowrank_grads`` makes it (this
        rank's shard along the kept dimension, else replicated). Shards that
        ``backward_reduce`` reduce-scattered are the rank mean already; whole R (dim-0
        fallback matrices, or unsharded accumulation) are averaged in one flat all-reduce
        of all of them. The projected weights took no part in FSDP's reduce-scatter."""
        out: list[DTensor | None] = []
        whole: list[tuple[int, torch.Tensor, ShardLayout]] = []
        for p, r, side in items:
            lay = self.layout(p, side)
            if lay.kept and self.shard_lowrank_accumulation:
                shape = list(r.shape)
                shape[lay.dim] = p.shape[lay.dim]
                out.append(DTensor.from_local(r, self.mesh, [Shard(lay.dim)], run_check=False,
                                              shape=torch.Size(shape), stride=(shape[1], 1)))
            else:
                whole.append((len(out), r, lay))
                out.append(None)
        if whole:
            flat = self._sum(torch.cat([r.reshape(-1) for _, r, _ in whole]), "lowrank_gradients")
            flat /= self.world
            for (i, r, lay), part in zip(whole, flat.split([r.numel() for _, r, _ in whole])):
                mean = part.view_as(r)
                if not lay.kept:
                    out[i] = DTensor.from_local(mean, self.mesh, [Replicate()], run_check=False)
                    continue
                local = mean.narrow(lay.dim, lay.start, lay.stop - lay.start).contiguous()
                out[i] = DTensor.from_local(local, self.mesh, [Shard(lay.dim)], run_check=False,
                                            shape=mean.shape, stride=mean.stride())
        return out

    def lowrank_grads(self, items: list[tuple[torch.Tensor, torch.Tensor, str]]
                      ) -> list[DTensor]:
        """Every matrix's R; the dim-0 fallback ones (each rank holds a partial sum) are
        all-reduced together in one flat bucket instead of one blocking call each."""
        out: list[DTensor | None] = []
        partial: list[tuple[int, torch.Tensor]] = []
        for p, basis, side in items:
            lay = self.layout(p, side)
            if lay.kept:
                out.append(self._kept_lowrank_grad(p, basis, side, lay))
            else:
                partial.append((len(out), project(p.grad.to_local(),
                                                  self._own_rows(p, basis, lay), side)))
                out.append(None)
        if partial:
            flat = self._sum(torch.cat([r.reshape(-1) for _, r in partial]), "lowrank_gradients")
            for (i, r), part in zip(partial, flat.split([r.numel() for _, r in partial])):
                out[i] = DTensor.from_local(part.view_as(r), self.mesh, [Replicate()],
                                            run_check=False)
        return out

    def back_basis(self, p: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
        lay = self.layout(p, side)
        return self.full_basis(p, basis, side) if lay.kept else self._own_rows(p, basis, lay)
