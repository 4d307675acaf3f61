"""The sharded rSVD of lotus_dist.fsdp, and the rank-mean rSVD of low-rank DDP, equal the
single-process one, with sketch-sized traffic.

One 4-rank gloo job computes every case: subgroups of 2, 3 and 4 ranks shard tall and
wide gradients along the dimension the projection keeps (A column-sharded: sketch and
Gram all-reduces) and along the one it compresses (A row-sharded, FSDP's dim-0
fallback: sketch all-gathers), for sizes that the world size does and does not divide.
On an ill-conditioned gradient (sigma_i = 10^(-i/8), rank 32) the sharded and the DDP
rank-mean bases span the single-process basis's subspace, which is within 1e-2 of the
exact one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lotus_dist.fsdp import lotus_shard_dim
from lotus_dist.projection import projection_side, refresh_generator, rsvd_basis, subspace_error

RANK, OVERSAMPLE, POWER_ITERS = 3, 2, 2
SHAPES = {"tall": (10, 7), "wide": (6, 11)}
CASES = [(world, shape, dim) for world in (2, 3, 4) for shape in SHAPES for dim in (0, 1)]


#: The ill-conditioned cases: (world, shape, shard dim) at rank 32, 8 oversampling columns,
#: one power iteration; "ddp" in place of a shard dim is the rank-mean of rank-local A.
ILL_RANK, ILL_OVERSAMPLE, ILL_POWER_ITERS = 32, 8, 1
ILL_SHAPES = {"tall": (512, 256), "wide": (256, 512)}
ILL_CASES = [(world, shape, dim) for world in (2, 4) for shape in ILL_SHAPES
             for dim in (0, 1, "ddp")]


def _ill_id(case: tuple[int, str, int | str]) -> str:
    world, shape, dim = case
    return f"{world}ranks-{shape}-" + ("ddp" if dim == "ddp" else f"shard{dim}")


def _ill_gradient(shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return ((u * 10 ** (-torch.arange(k, dtype=torch.float64) / 8)) @ v.T).float()


def _exact_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    return u[:, :rank] if side == "left" else vh[:rank].T


def _case_id(case: tuple[int, str, int]) -> str:
    world, shape, dim = case
    m, n = SHAPES[shape]
    side = projection_side((m, n), "std")
    kept = "kept" if dim == (0 if side == "right" else 1) else "compressed"
    even = "even" if SHAPES[shape][dim] % world == 0 else "uneven"
    return f"{world}ranks-{shape}-shard{dim}-{kept}-{even}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gradient(shape: tuple[int, int]) -> torch.Tensor:
    """A gradient with a decaying spectrum, the same on every rank."""
    gen = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen)).Q
    return (u * torch.logspace(0, -2, min(m, n))) @ v.T


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lotus_dist.ddp import LowRankDDPComm
    from lotus_dist.fsdp import FSDPComm

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    collective_sizes: list[tuple[str, tuple[int, ...]]] = []
    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def recording_all_reduce(t, *args, **kwargs):
        collective_sizes.append((case_id, tuple(t.shape)))
        return all_reduce(t, *args, **kwargs)

    def recording_all_gather(parts, t, *args, **kwargs):  # rows of a (batch, rows, l) sketch
        collective_sizes.append((case_id, (t.shape[0], len(parts) * t.shape[1], t.shape[2])))
        return all_gather(parts, t, *args, **kwargs)

    results = {}
    try:
        groups = {ws: dist.new_group(list(range(ws))) for ws in (2, 3, 4)}
        dist.all_reduce, dist.all_gather = recording_all_reduce, recording_all_gather
        for case in CASES:
            case_id = _case_id(case)
            sub_world, shape_name, dim = case
            if rank >= sub_world:
                continue
            mesh = DeviceMesh.from_group(groups[sub_world], "cpu")
            grad = _gradient(SHAPES[shape_name])
            p = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, [Shard(dim)],
                                                src_data_rank=None))
            p.grad = distribute_tensor(grad, mesh, [Shard(dim)], src_data_rank=None)
            comm = FSDPComm(mesh)
            side = projection_side(grad.shape, "std")
            gen = refresh_generator(0, 0, 0)
            sharded = rsvd_basis(p.grad.to_local(), RANK, side, oversample=OVERSAMPLE,
                                 power_iters=POWER_ITERS, generator=gen,
                                 comm=comm.rsvd_comm(p, side))
            reference = rsvd_basis(grad, RANK, side, oversample=OVERSAMPLE,
                                   power_iters=POWER_ITERS, generator=refresh_generator(0, 0, 0))
            results[case_id] = {"sharded": sharded, "reference": reference}
        for case in ILL_CASES:
            case_id = _ill_id(case)
            sub_world, shape_name, dim = case
            if rank >= sub_world:
                continue
            grad = _ill_gradient(ILL_SHAPES[shape_name])
            side = projection_side(grad.shape, "std")
            options = {"oversample": ILL_OVERSAMPLE, "power_iters": ILL_POWER_ITERS}
            p = nn.Parameter(torch.zeros_like(grad))
            if dim == "ddp":  # each rank holds its own summand; the target is their mean
                gen = torch.Generator().manual_seed(3)
                spread = 0.02 * torch.randn(grad.shape, generator=gen)  # ||.||_2 ~ sigma_1
                summands = [grad + (w - (sub_world - 1) / 2) * spread for w in range(sub_world)]
                local, target = summands[rank], torch.stack(summands).double().mean(0).float()
                comm = LowRankDDPComm(group=groups[sub_world])
            else:
                mesh = DeviceMesh.from_group(groups[sub_world], "cpu")
                p = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, [Shard(dim)],
                                                    src_data_rank=None))
                p.grad = distribute_tensor(grad, mesh, [Shard(dim)], src_data_rank=None)
                comm, local, target = FSDPComm(mesh), p.grad.to_local(), grad
            distributed = rsvd_basis(local, ILL_RANK, side, generator=refresh_generator(0, 0, 0),
                                     comm=comm.rsvd_comm(p, side), **options)
            reference = rsvd_basis(target, ILL_RANK, side, generator=refresh_generator(0, 0, 0),
                                   **options)
            results[case_id] = {"distributed": distributed, "reference": reference,
                                "exact": _exact_basis(target, ILL_RANK, side)}
    finally:
        dist.all_reduce, dist.all_gather = all_reduce, all_gather
    torch.save({"results": results, "collectives": collective_sizes},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("rsvd")
    mp.spawn(_worker, args=(4, _free_port(), str(out)), nprocs=4)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sharded_rsvd_equals_unsharded_for_the_same_seed(ranks, case):
    case_id = _case_id(case)
    members = [r["results"][case_id] for r in ranks[: case[0]]]
    for got in members:
        torch.testing.assert_close(got["sharded"], got["reference"], atol=2e-5, rtol=0)
        torch.testing.assert_close(got["sharded"], members[0]["sharded"], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ILL_CASES, ids=_ill_id)
def test_distributed_rsvd_keeps_the_subspace_of_an_ill_conditioned_gradient(ranks, case):
    members = [r["results"][_ill_id(case)] for r in ranks[: case[0]]]
    for got in members:
        assert subspace_error(got["reference"], got["exact"]) <= 1e-2
        assert subspace_error(got["distributed"], got["exact"]) <= 1e-2
        # both are within fp32 rounding of each other (a summation order apart)
        assert subspace_error(got["distributed"], got["reference"]) <= 1e-3
        torch.testing.assert_close(got["distributed"], members[0]["distributed"], atol=0, rtol=0)


@pytest.mark.slow
def test_sharded_rsvd_collectives_are_sketch_sized(ranks):
    """No collective moves a gradient: each is (m or n) x (r + p) or (r + p) x (r + p),
    in a batch of one (rsvd_basis is rsvd_bases of one matrix)."""
    widths = {_case_id(c): (RANK + OVERSAMPLE, SHAPES[c[1]]) for c in CASES}
    widths |= {_ill_id(c): (ILL_RANK + ILL_OVERSAMPLE, ILL_SHAPES[c[1]]) for c in ILL_CASES}
    seen = set()
    for case_id, size in ranks[0]["collectives"]:
        width, (m, n) = widths[case_id]
        batch, *size = size
        assert batch == 1 and len(size) == 2, (case_id, size)
        assert width in size and max(size) <= max(m, n), (case_id, size)
        seen.add(case_id)
    assert seen == set(widths)


def test_projected_weights_shard_on_the_kept_dim_unless_fsdp_cannot():
    assert lotus_shard_dim((12, 8), "right", 4) == 0  # rows kept; dim 0 may be uneven
    assert lotus_shard_dim((9, 8), "right", 4) == 0
    assert lotus_shard_dim((6, 16), "left", 4) == 1  # columns kept, 16 = 4 x 4
    assert lotus_shard_dim((6, 14), "left", 4) == 0  # FSDP2: no uneven dim-1 sharding
