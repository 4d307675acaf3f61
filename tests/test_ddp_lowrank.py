"""Low-rank DDP: N ranks equal one process on the same global batch, with only R on the wire."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lotus_dist.optim
from lotus_dist import LotusAdamW, lotus_param_groups
from lotus_dist.comm import DataParallelComm, InconsistentBasisError, LocalComm
from lotus_dist.ddp import LowRankDDPComm, LowRankReducer

STEPS = 12


class TwoMatrices(nn.Module):
    """A tall and a wide projected matrix plus a plain embedding and head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.mlp = nn.Sequential(nn.Linear(12, 40, bias=False), nn.Tanh(),
                                 nn.Linear(40, 12, bias=False))
        self.head = nn.Linear(12, 30, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(x)))


def global_batches(world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 30, (4 * world, 9), generator=g) for _ in range(STEPS)]


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def make(options: dict, comm: LocalComm | None = None) -> tuple[nn.Module, LotusAdamW]:
    torch.manual_seed(0)
    model = TwoMatrices()
    opt = LotusAdamW(lotus_param_groups(model, 3, **options), lr=0.02, seed=5, comm=comm)
    return model, opt


def refresh_counts(opt: LotusAdamW) -> dict[str, int]:
    return {k: v["refresh_count"] for k, v in opt.telemetry().items()}


def clipped_step(opt: LotusAdamW) -> float:
    """prepare, clip on the consumed norm at 1.0, update; return the norm."""
    assert opt.prepare()
    norm = opt.consumed_grad_norm()
    if norm > 1.0:
        opt.scale_consumed_grads(1.0 / (norm + 1e-6))
    opt.step()
    return norm


def run_single(options: dict, world: int) -> tuple[dict, dict, list[float]]:
    """One process on the global batch; clip on the consumed norm like low-rank DDP."""
    model, opt = make(options)
    norms = []
    for batch in global_batches(world):
        opt.zero_grad()
        loss_of(model, batch).backward()
        norms.append(clipped_step(opt))
    return model.state_dict(), refresh_counts(opt), norms


def _join(rank: int, world: int, port: int) -> None:
    """This spawned process becomes rank ``rank`` of a gloo group, on one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _patch_rsvd(transform) -> None:
    """Make this rank's rSVD bases ``transform(grad, basis)`` of the true ones."""
    plain_rsvd = lotus_dist.optim.rsvd_basis

    def patched(grad, rank_, side, **kwargs):
        return transform(grad, plain_rsvd(grad, rank_, side, **kwargs))

    lotus_dist.optim.rsvd_basis = patched


def two_micro_batch_step(model, opt, comm, reducer, local, set_to_none: bool = True) -> float:
    """One low-rank DDP step on this rank's 4 sequences in two micro-batches, with
    communication on the last only; returns the clipped norm."""
    opt.zero_grad(set_to_none=set_to_none)
    comm.reset()
    reducer.boundary = False
    (loss_of(model, local[:2]) / 2).backward()
    reducer.boundary = True
    (loss_of(model, local[2:]) / 2).backward()
    reducer.finish()
    return clipped_step(opt)


def _worker(rank: int, world: int, port: int, options: dict, out: str, perturb: bool) -> None:
    _join(rank, world, port)
    comm = LowRankDDPComm()
    model, opt = make(options, comm)
    reducer = LowRankReducer(model, opt, comm, bucket_mb=0.001)  # tiny: several in flight
    if perturb:  # each rank disturbs the statistics it feeds into the decision reduce
        reduce = comm.stats_reduce
        comm.stats_reduce = lambda flat: reduce(flat * (1 + 1e-3 * (rank - 0.5)))
    norms = []
    for batch in global_batches(world):
        local = batch[rank * 4:(rank + 1) * 4]
        norms.append(two_micro_batch_step(model, opt, comm, reducer, local))
    torch.save({"weights": model.state_dict(), "refreshes": refresh_counts(opt),
                "bytes": dict(comm.bytes),
                "norms": norms}, f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path, options: dict, world: int, perturb: bool = False) -> list[dict]:
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(world, _free_port(), options, out, perturb), nprocs=world)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


LOTUS = {"projection": "rsvd", "switch": "displacement", "verify_gap": 2, "gamma": 2.0}
GALORE = {"projection": "svd", "switch": "fixed", "update_proj_gap": 4}
MOMENTUM = {"projection": "rsvd", "switch": "momentum_displacement", "verify_gap": 2,
            "gamma": 2.0, "moments": "rotate"}


@pytest.mark.parametrize(("options", "world"), [(LOTUS, 2), (LOTUS, 4), (GALORE, 2),
                                                (GALORE, 4), (MOMENTUM, 2)],
                         ids=["lotus-2", "lotus-4", "galore-2", "galore-4", "momentum-rotate-2"])
def test_ranks_equal_one_process_on_the_global_batch(tmp_path, options, world):
    weights, refreshes, norms = run_single(options, world)
    ranks = run_ranks(tmp_path, options, world)
    for r in ranks:
        assert r["refreshes"] == refreshes
        # the consumed norm is scale-sensitive where Adam's update is not
        assert r["norms"] == pytest.approx(norms, rel=1e-5)
        for name, w in weights.items():
            torch.testing.assert_close(r["weights"][name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert min(refreshes.values()) >= 3  # the run crossed several refreshes


def test_only_low_rank_and_plain_gradients_cross_the_wire(tmp_path):
    (r0, *_) = run_ranks(tmp_path, GALORE, 2)
    model, _ = make(GALORE)
    plain = model.embed.weight.numel() + model.head.weight.numel()
    # R of a (40, 12) right-projected and a (12, 40) left-projected matrix at rank 3
    lowrank = 40 * 3 + 3 * 40
    # refresh steps (0, 4, 8) reduce R after the SVD; svd all-reduces the full gradient
    refresh_steps = 3
    assert r0["bytes"]["full_gradients"] == 4 * (STEPS * plain + refresh_steps * 2 * 480)
    assert r0["bytes"]["lowrank_gradients"] == 4 * STEPS * lowrank
    assert "sketches" not in r0["bytes"]


def test_rsvd_refreshes_communicate_sketches_not_gradients(tmp_path):
    (r0, *_) = run_ranks(tmp_path, LOTUS, 2)
    model, _ = make(LOTUS)
    plain = model.embed.weight.numel() + model.head.weight.numel()
    assert r0["bytes"]["full_gradients"] == 4 * STEPS * plain
    assert r0["bytes"]["sketches"] > 0


def test_rank_dependent_statistics_still_give_one_decision(tmp_path):
    ranks = run_ranks(tmp_path, {**LOTUS, "gamma": 0.3}, 2, perturb=True)
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"]
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], w), name


def _corrupt_worker(rank: int, world: int, port: int, out: str, lowrank: bool) -> None:
    """The last rank computes a different basis for mlp.0 at its first refresh; the
    consistency check must stop every rank, naming that matrix."""
    _join(rank, world, port)
    _patch_rsvd(lambda grad, basis: basis + 1e-3
                if rank == world - 1 and grad.shape == (40, 12) else basis)
    comm = (LowRankDDPComm(check_consistency=True) if lowrank
            else DataParallelComm(check_consistency=True))
    model, opt = make(LOTUS, comm)
    if lowrank:
        reducer = LowRankReducer(model, opt, comm)
    else:  # plain DDP: every rank averages the full gradients, then decides alone
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    message = None
    try:
        for batch in global_batches(world)[:2]:
            opt.zero_grad()
            loss_of(model, batch[rank * 4:(rank + 1) * 4]).backward()
            if lowrank:
                reducer.finish()
            else:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
    except InconsistentBasisError as e:
        message = str(e)
    torch.save(message, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("lowrank", [True, False], ids=["lowrank_ddp", "ddp"])
def test_consistency_check_names_the_corrupted_basis(tmp_path, lowrank):
    out = str(tmp_path / "rank")
    mp.spawn(_corrupt_worker, args=(2, _free_port(), out, lowrank), nprocs=2)
    for r in range(2):
        message = torch.load(f"{out}.{r}", weights_only=True)
        assert message is not None and "mlp.0.weight" in message
        assert "rank(s) [1]" in message


def _mixed_gpu_worker(rank: int, world: int, port: int, out: str) -> None:
    """Plain DDP whose ranks compute bases and statistics a little differently, as
    different GPU models do in the last bits: the replicas must stay identical."""
    _join(rank, world, port)
    _patch_rsvd(lambda grad, basis: basis * (1.0 + 1e-6 * rank))
    comm = DataParallelComm()
    reduce = comm.stats_reduce
    comm.stats_reduce = lambda flat: reduce(flat * (1.0 + 1e-6 * rank))
    model, opt = make({**LOTUS, "gamma": 0.3}, comm)
    for p in model.parameters():
        dist.broadcast(p.data, 0)
    for batch in global_batches(world):
        opt.zero_grad()
        loss_of(model, batch[rank * 4:(rank + 1) * 4]).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
    torch.save({"weights": model.state_dict(), "refreshes": refresh_counts(opt)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_plain_ddp_replicas_keep_rank0s_bases_and_one_decision(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_mixed_gpu_worker, args=(2, _free_port(), out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert ranks[0]["refreshes"] == ranks[1]["refreshes"]
    assert max(ranks[0]["refreshes"].values()) >= 2
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], w), name
