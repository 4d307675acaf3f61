"""Refresh bursts: batched rSVDs and exact SVDs shared out over the ranks.

A batched rSVD of same-shape gradients equals one rSVD per matrix (and the plain 2-D
algorithm it replaced), zero and rank-deficient gradients included; a burst costs one
reduce per sketch stage for each (shape, layout) batch, not one per matrix. On 2 and 3
gloo ranks, under plain DDP, low-rank DDP and FSDP, each rank computes only its share of
the exact SVDs, and every rank ends with the single-process bases bitwise (fp64), each
basis sent once; the batched distributed rSVD matches the single-process one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp
from test_ddp_lowrank import _free_port, _join
from torch import nn

import lotus_dist.optim
from lotus_dist import LotusAdamW
from lotus_dist.comm import LocalComm, svd_owners
from lotus_dist.projection import (
    RsvdComm,
    canonical_signs,
    draw,
    orthonormalize,
    projected_dim,
    projection_side,
    refresh_generator,
    rsvd_bases,
    rsvd_basis,
    rsvd_batch_size,
)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _gradients(shape: tuple[int, int], dtype: torch.dtype, count: int = 5) -> list[torch.Tensor]:
    """Random gradients of one shape, the second zero and the third of rank 2."""
    gen = torch.Generator().manual_seed(sum(shape))
    grads = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(count)]
    grads[1] = torch.zeros(shape, dtype=dtype)
    grads[2] = (torch.randn(shape[0], 2, generator=gen, dtype=dtype)
                @ torch.randn(2, shape[1], generator=gen, dtype=dtype))
    return grads


def _plain_rsvd(grad: torch.Tensor, rank: int, side: str, oversample: int, power_iters: int,
                generator: torch.Generator) -> torch.Tensor:
    """The per-matrix 2-D algorithm the batched one replaced (one host sync per Gram)."""
    a = grad if side == "left" else grad.T
    d, k = a.shape
    y = a @ draw((k, min(rank + oversample, d)), generator, a.device, a.dtype)
    for _ in range(power_iters):
        z = a.T @ orthonormalize(y)
        g = z.double().T @ z.double()
        trace = float(g.diagonal().sum())
        if trace > 0:
            g /= trace
            g.diagonal().add_(g.shape[0] * torch.finfo(torch.float64).eps)
            upper = torch.linalg.cholesky(g, upper=True)
            inverse = torch.linalg.solve_triangular(upper, torch.eye(g.shape[0]).double(),
                                                    upper=True)
            z = (z / math.sqrt(trace)) @ inverse.to(z.dtype)
        y = a @ z
    q = orthonormalize(y)
    bt = a.T @ q
    _, evecs = torch.linalg.eigh(bt.double().T @ bt.double())
    return canonical_signs(q @ evecs[:, -rank:].flip(-1).to(q.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("shape", "side"), [((48, 32), "right"), ((32, 48), "left")])
def test_batched_rsvd_equals_one_rsvd_per_matrix(dtype, shape, side):
    grads = _gradients(shape, dtype)
    options = {"oversample": 4, "power_iters": 2}
    batched = rsvd_bases(grads, 6, side, generators=[refresh_generator(0, i, 3)
                                                     for i in range(len(grads))], **options)
    for i, (grad, got) in enumerate(zip(grads, batched)):
        one = rsvd_basis(grad, 6, side, generator=refresh_generator(0, i, 3), **options)
        plain = _plain_rsvd(grad, 6, side, generator=refresh_generator(0, i, 3), **options)
        assert got.shape == (projected_dim(shape, side), 6) and got.dtype == dtype
        assert got.isfinite().all()
        torch.testing.assert_close(got, one, atol=TOL[dtype], rtol=0)
        torch.testing.assert_close(got, plain, atol=10 * TOL[dtype], rtol=0)
        if i != 1:  # a zero gradient spans nothing; the rest come out orthonormal
            torch.testing.assert_close(got.T @ got, torch.eye(6, dtype=dtype),
                                       atol=1e-5, rtol=0)


def test_batch_size_caps_the_workspace_at_7b_shapes():
    """At 7b (rank 1024, 8 oversampling columns) a batch takes 4 MLP or 7 attention
    matrices; a bf16 gradient's fp32 copy counts too."""
    def size(shape, dtype=torch.float32):
        grad = torch.empty(shape, device="meta", dtype=dtype)
        return rsvd_batch_size(grad, 1024, projection_side(shape, "std"), 8)

    assert size((11008, 4096)) == size((4096, 11008)) == 4
    assert size((4096, 4096)) == 7
    assert size((11008, 4096), torch.bfloat16) == 1
    assert size((512, 256)) > 100


class CountingComm(LocalComm):
    """One process whose rSVD reduces count their calls and record each batch size."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.batches: list[int] = []

    def rsvd_comm(self, p: torch.Tensor, side: str) -> RsvdComm:
        def counted(stage: str):
            def reduce(t: torch.Tensor) -> torch.Tensor:
                self.calls[stage] += 1
                self.batches.append(t.shape[0])
                return t
            return reduce

        return RsvdComm(sketch=counted("sketch"), cosketch=counted("cosketch"),
                        gram=counted("gram"))


def _burst(comm: LocalComm) -> list[torch.Tensor]:
    """Step 1 of five 24x16 and two 16x40 matrices (all refresh); their new bases."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(24, 16) for _ in range(5)] + [torch.zeros(16, 40) for _ in range(2)]
    params.insert(2, params.pop())  # the two shapes interleaved in parameter order
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = LotusAdamW([{"params": params, "rank": 4, "power_iters": 1, "oversample": 3}],
                     comm=comm)
    assert opt.prepare()
    return [opt.state[p]["basis"] for p in params]


def test_a_burst_reduces_once_per_stage_and_batch(monkeypatch):
    comm = CountingComm()
    batched = _burst(comm)
    # one power iteration: two sketches, two co-sketches, two Grams per batch, 2 batches
    assert comm.calls == {"sketch": 4, "cosketch": 4, "gram": 4}
    assert sorted(set(comm.batches)) == [2, 5]

    monkeypatch.setattr(lotus_dist.optim, "rsvd_batch_size", lambda *args, **kwargs: 2)
    capped = CountingComm()
    in_twos = _burst(capped)  # 5 -> batches of 2, 2, 1; 2 -> one batch
    assert capped.calls == {"sketch": 8, "cosketch": 8, "gram": 8}
    monkeypatch.setattr(lotus_dist.optim, "rsvd_batch_size", lambda *args, **kwargs: 1)
    alone = _burst(CountingComm())
    for b, two, one in zip(batched, in_twos, alone):  # a matrix's numbers are its own
        torch.testing.assert_close(two, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(one, b, atol=1e-6, rtol=0)


def test_svd_owners_balance_by_cost_and_cover_every_matrix():
    owned = svd_owners([8.0, 1.0, 4.0, 4.0, 1.0, 2.0], 3)
    assert owned == [[0], [2, 5], [3, 1, 4]]  # largest first, each list largest first
    assert sorted(i for share in owned for i in share) == list(range(6))
    assert svd_owners([1.0], 4) == [[0], [], [], []]


# --------------------------------------------------------------------- gloo ranks

#: Exact SVDs: shapes of every FSDP case (rows kept, even and not; columns kept; the
#: dim-0 fallback), two of them repeated.
SVD_SHAPES = [(10, 6), (6, 14), (9, 6), (12, 8), (6, 16), (10, 6), (5, 14)]
#: rSVDs: two batches of three; 6x14 is column-sharded at 2 ranks, row-sharded at 3.
RSVD_SHAPES = [(10, 6), (6, 14), (10, 6), (6, 14), (10, 6), (6, 14)]
RANK = 3
ENGINES = ("ddp", "ddp_lowrank", "fsdp")
OPTIONS = {"svd": {"projection": "svd"},
           "rsvd": {"projection": "rsvd", "oversample": 2, "power_iters": 1}}


def _summands(shapes: list[tuple[int, int]], world: int) -> list[list[torch.Tensor]]:
    """Per matrix, each rank's fp64 summand: small integers, so any summation order
    gives the same mean bitwise."""
    gen = torch.Generator().manual_seed(11)
    return [[torch.randint(-8, 9, shape, generator=gen).double() for _ in range(world)]
            for shape in shapes]


def _optimizer(engine: str, shapes, kind: str, rank: int, world: int, mesh=None):
    """A LotusAdamW over matrices of ``shapes`` whose gradients are set for ``engine``
    (low-rank DDP: this rank's summand; the others: the mean), and its parameters."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from lotus_dist.comm import DataParallelComm
    from lotus_dist.ddp import LowRankDDPComm
    from lotus_dist.fsdp import FSDPComm, lotus_shard_dim

    params = []
    for shape, summands in zip(shapes, _summands(shapes, world)):
        mean = torch.stack(summands).sum(0) / world
        if engine == "fsdp":
            dim = [Shard(lotus_shard_dim(shape, projection_side(shape, "std"), world))]
            p = nn.Parameter(distribute_tensor(torch.zeros(shape, dtype=torch.float64), mesh,
                                               dim, src_data_rank=None))
            p.grad = distribute_tensor(mean, mesh, dim, src_data_rank=None)
        else:
            p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
            p.grad = summands[rank] if engine == "ddp_lowrank" else mean
        params.append(p)
    comm = {"ddp": DataParallelComm, "ddp_lowrank": LowRankDDPComm,
            "fsdp": lambda: FSDPComm(mesh), "local": LocalComm}[engine]()
    return LotusAdamW([{"params": params, "rank": RANK, **OPTIONS[kind]}], comm=comm), params


def _counting(fn: Callable, counter: Counter[str], key: str | None = None) -> Callable:
    """``fn``, counting each call in ``counter`` under ``key`` (default: the call's last
    positional argument)."""
    def inner(*args, **kwargs):
        counter[key or args[-1]] += 1
        return fn(*args, **kwargs)
    return inner


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import lotus_dist.comm

    _join(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    svd_calls: list[tuple[int, int]] = []
    plain_svd = lotus_dist.comm.svd_basis

    def counting_svd(grad, rank_, side):
        svd_calls.append(tuple(grad.shape))
        return plain_svd(grad, rank_, side)

    collectives: Counter[str] = Counter()
    for name in ("broadcast", "gather", "reduce"):
        setattr(dist, name, _counting(getattr(dist, name), collectives, name))
    lotus_dist.comm.svd_basis = counting_svd

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    results = {}
    for kind, shapes, engines in (("svd", SVD_SHAPES, ENGINES),
                                  ("rsvd", RSVD_SHAPES, ("ddp_lowrank", "fsdp"))):
        local, local_params = _optimizer("local", shapes, kind, rank, world)
        assert local.prepare()
        reference = [local.state[p]["basis"] for p in local_params]
        for engine in engines:
            opt, params = _optimizer(engine, shapes, kind, rank, world, mesh)
            sketches: Counter[str] = Counter()  # the comm's reduces by kind (last argument)
            for method in ("_sum", "_mean", "_gather_rows"):
                if hasattr(opt.comm, method):
                    setattr(opt.comm, method, _counting(getattr(opt.comm, method), sketches))
            svd_calls.clear()
            collectives.clear()
            assert opt.prepare()
            results[kind, engine] = {
                "svd_calls": list(svd_calls), "collectives": dict(collectives),
                "sketch_reduces": sketches["sketches"], "bytes": dict(opt.comm.bytes),
                "bases": [whole(opt.state[p]["basis"]).clone() for p in params],
                "reference": reference}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, list[dict]]:
    out = tmp_path_factory.mktemp("refresh-batching")
    runs = {}
    for world in (2, 3):
        mp.spawn(_worker, args=(world, _free_port(), str(out / f"w{world}")), nprocs=world)
        runs[world] = [torch.load(out / f"w{world}.{r}", weights_only=True)
                       for r in range(world)]
    return runs


def _svd_cost(shape: tuple[int, int]) -> float:
    m, n = shape
    return float(m * n * min(m, n))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_computes_its_share_of_the_svds(ranks, world, engine):
    owned = svd_owners([_svd_cost(s) for s in SVD_SHAPES], world)
    calls = [r["svd", engine]["svd_calls"] for r in ranks[world]]
    for rank, share in enumerate(owned):
        assert sorted(calls[rank]) == sorted(SVD_SHAPES[i] for i in share), rank
    assert sorted(c for rank_calls in calls for c in rank_calls) == sorted(SVD_SHAPES)
    assert max(map(len, calls)) < len(SVD_SHAPES)  # not every SVD on every rank


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("world", [2, 3])
def test_shared_svd_bases_equal_one_process_bitwise(ranks, world, engine):
    bases_bytes = sum(projected_dim(s, projection_side(s, "std")) * RANK * 8 for s in SVD_SHAPES)
    for r in ranks[world]:
        got = r["svd", engine]
        for basis, reference in zip(got["bases"], got["reference"]):
            assert torch.equal(basis, reference)
        # one flat broadcast per owner, and the basis is not broadcast again when stored
        assert got["collectives"]["broadcast"] == world
        if engine != "fsdp":  # FSDP also counts the bases it gathers to project
            assert got["bytes"]["bases"] == bases_bytes
        # the gradient reaches its owner only: a gather (FSDP) or a reduce (low-rank DDP)
        moved = {"ddp": {}, "ddp_lowrank": {"reduce": 7}, "fsdp": {"gather": 7}}[engine]
        assert {k: v for k, v in got["collectives"].items() if k != "broadcast"} == moved


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp_lowrank", "fsdp"])
@pytest.mark.parametrize("world", [2, 3])
def test_a_distributed_burst_reduces_once_per_stage_and_batch(ranks, world, engine):
    """Two batches of three; one power iteration: four sketch collectives per batch."""
    for r in ranks[world]:
        got = r["rsvd", engine]
        assert got["sketch_reduces"] == 8
        for basis, reference in zip(got["bases"], got["reference"]):
            torch.testing.assert_close(basis, reference, atol=1e-10, rtol=0)
        for basis, first in zip(got["bases"], ranks[world][0]["rsvd", engine]["bases"]):
            assert torch.equal(basis, first)
