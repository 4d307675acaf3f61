"""LotusAdamW on FSDP2-sharded weights equals single-process LotusAdamW; decisions agree.

A toy model of independent linear maps with awkward shapes covers every sharding case at
2 and 4 ranks: rows kept and sharded on dim 0, evenly and unevenly (one rank empty at 4),
columns kept and sharded on dim 1, and the dim-0 fallback (columns kept, width not
divisible: R all-reduced, moments replicated). One gloo job per world size runs all
scenarios; the tests assert on what they recorded.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lotus_dist import LotusAdamW, lotus_param_groups
from lotus_dist.comm import LocalComm
from lotus_dist.fsdp import lotus_shard_dim
from lotus_dist.projection import projection_side

#: (m, n) of each projected map; comments: placement at 2 ranks / at 4 ranks.
SHAPES = {
    "tall_proj": (12, 8),     # rows kept: Shard(0) / Shard(0)
    "uneven_proj": (9, 6),    # rows kept: Shard(0) 5+4 / 3+3+3+0
    "wide_proj": (6, 16),     # columns kept: Shard(1) / Shard(1)
    "odd_proj": (5, 14),      # columns kept: Shard(1) / fallback Shard(0) 2+2+1+0
    "fallback_proj": (4, 9),  # columns kept: fallback Shard(0) / fallback Shard(0)
}
BATCH, STEPS, RANK = 8, 8, 3
SCENARIOS: dict[str, dict[str, Any]] = {
    "lotus": {"projection": "rsvd", "switch": "displacement", "verify_gap": 2, "gamma": 0.5},
    "galore": {"projection": "svd", "switch": "fixed", "update_proj_gap": 3},
    "lotus_rotate_recovery": {"projection": "rsvd", "switch": "path_efficiency",
                              "verify_gap": 2, "gamma": 0.9, "moments": "rotate",
                              "recovery_scaling": True},
    "lotus_momentum": {"projection": "rsvd", "switch": "momentum_displacement",
                       "verify_gap": 2, "gamma": 0.5},
}
RESUME_AT = 4


class Toy(nn.Module):
    """Independent least-squares problems, one per shape, plus a non-projected scale."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleDict({k: nn.Linear(n, m, bias=False)
                                   for k, (m, n) in SHAPES.items()})
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = torch.zeros(())
        for name, linear in self.maps.items():
            out = linear(inputs[name])
            target = torch.sin(torch.arange(out.shape[-1], dtype=torch.float32))
            loss = loss + (out - target).pow(2).mean()
        return loss * self.scale.sum() / 3

    @torch.no_grad()
    def init_weights(self) -> None:
        gen = torch.Generator().manual_seed(0)
        for _, p in sorted(self.named_parameters(), key=lambda item: item[0]):
            value = torch.randn(p.shape, generator=gen) * 0.3 if p.dim() == 2 else torch.ones(3)
            if isinstance(p, DTensor):  # every rank drew the whole tensor: keep the shard
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(BATCH, n, generator=gen) for k, (_, n) in SHAPES.items()}


def make_optimizer(model: nn.Module, options: dict[str, Any],
                   comm: LocalComm | None = None) -> LotusAdamW:
    groups = lotus_param_groups(model, RANK, ["maps"], **options)
    return LotusAdamW(groups, lr=0.05, seed=1, comm=comm)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model: Toy, opt: LotusAdamW, steps: range, rank: int = 0, world: int = 1,
          on_step=None) -> dict[str, list]:
    """Steps over this rank's slice of each global batch; the global mean loss and every
    matrix's refresh count after each step."""
    import torch.distributed as dist

    losses, refreshes = [], []
    for step in steps:
        per = BATCH // world
        loss = model({k: v[rank * per:(rank + 1) * per] for k, v in global_batch(step).items()})
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / world)
        refreshes.append({k: v["refresh_count"] for k, v in opt.telemetry().items()})
        if on_step is not None:
            on_step(step)
    return {"losses": losses, "refreshes": refreshes}


def snapshot(model: nn.Module, opt: LotusAdamW) -> dict[str, torch.Tensor]:
    """Whole weights and whole moments, keyed by name."""
    out = {name: full(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = full(opt.state[p][key])
    return out


# --------------------------------------------------------------------- the ranks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_toy(mesh, world: int, options: dict[str, Any], check_consistency: bool = False,
                 shard_bases: bool = True):
    from torch.distributed.fsdp import fully_shard

    from lotus_dist.fsdp import FSDPComm, lotus_shard_placement, projected_sides

    with torch.device("meta"):
        model = Toy()
    placement = lotus_shard_placement(projected_sides(model, RANK, ["maps"], "std"), world)
    for linear in model.maps.values():
        fully_shard(linear, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = make_optimizer(model, options, FSDPComm(mesh, check_consistency=check_consistency,
                                                   shard_bases=shard_bases))
    return model, opt


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import lotus_dist.optim
    from launcher.train_state import ModelState, OptimizerState
    from lotus_dist.comm import InconsistentBasisError
    from lotus_dist.switching import SWITCH_POLICIES

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}

    # Equivalence, with the consistency check on (it must stay silent).
    for name, options in SCENARIOS.items():
        model, opt = _sharded_toy(mesh, world, options, check_consistency=True)
        out[name] = train(model, opt, range(STEPS), rank, world)
        out[name]["final"] = snapshot(model, opt)
    out["shard_dims"] = {n: p.placements[0].dim for n, p in model.named_parameters()}

    # Bases kept whole on every rank instead of sharded by rows: the same run.
    model, opt = _sharded_toy(mesh, world, SCENARIOS["lotus"], shard_bases=False)
    out["whole_bases"] = train(model, opt, range(STEPS), rank, world)
    out["whole_bases"]["final"] = snapshot(model, opt)
    out["whole_bases"]["distributed"] = any(isinstance(s["basis"], DTensor)
                                            for s in opt.state.values() if "basis" in s)
    out["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}

    # Resume: 2 ranks save a sharded checkpoint mid-run, 4 ranks load it and go on.
    ckpt = Path(out_dir) / "resume-ckpt"
    model, opt = _sharded_toy(mesh, world, SCENARIOS["lotus"])
    state = {"model": ModelState(model), "optimizer": OptimizerState(model, opt)}
    if world == 2:
        train(model, opt, range(RESUME_AT), rank, world)
        dcp.save(state, checkpoint_id=ckpt)
    else:
        dcp.load(state, checkpoint_id=ckpt)
        out["resumed"] = train(model, opt, range(RESUME_AT, STEPS), rank, world)
        out["resumed"]["final"] = snapshot(model, opt)

    # Rank-dependent noise in the local statistics; record what each rank would decide
    # from its own numbers next to what it does decide from the reduced ones.
    policy = SWITCH_POLICIES["displacement"]
    local_votes: list[bool] = []
    plain_stats = policy.stats

    def noisy_stats(group, state, r, g):
        stats = plain_stats(group, state, r, g)
        if stats is None:
            return None
        noise = torch.rand(stats.shape, generator=torch.Generator().manual_seed(rank))
        stats = stats * (1.0 + rank * noise)  # rank 0 keeps its numbers, the others do not
        vote = dict(state)
        policy.decide(group, vote, r, g, stats.double().tolist())
        local_votes.append(bool(vote.get("refresh_pending")))
        return stats

    policy.stats = noisy_stats
    try:
        model, opt = _sharded_toy(mesh, world, SCENARIOS["lotus"])
        out["perturbed"] = train(model, opt, range(STEPS), rank, world)
        out["perturbed"]["local_votes"] = local_votes
    finally:
        policy.stats = plain_stats

    # One rank computes a different basis for one matrix at a refresh.
    target = SHAPES["odd_proj"]
    plain_rsvd = lotus_dist.optim.rsvd_basis

    def corrupted_rsvd(grad, rank_, side, **kwargs):
        basis = plain_rsvd(grad, rank_, side, **kwargs)
        comm = kwargs["comm"]
        return basis + 1e-3 if rank == world - 1 and comm.shape == target else basis

    lotus_dist.optim.rsvd_basis = corrupted_rsvd
    try:
        model, opt = _sharded_toy(mesh, world, SCENARIOS["lotus"], check_consistency=True)
        train(model, opt, range(2), rank, world)
        out["consistency_error"] = None
    except InconsistentBasisError as e:
        out["consistency_error"] = str(e)
    finally:
        lotus_dist.optim.rsvd_basis = plain_rsvd

    out["memory"] = _engine_memory(world)
    torch.save(out, Path(out_dir) / f"{world}-rank{rank}.pt")
    dist.destroy_process_group()


# --------------------------------------------------------------------- memory


def _memory_config(world: int):
    from launcher.config import load_config

    return load_config("configs/tiny.yaml", [
        "model.max_seq_len=16", "training.seq_len=16", f"training.batch_size={2 * world}",
        "training.micro_batch_size=2", "optim.rank=8", "parallel.engine=fsdp"])


def _engine_memory(world: int) -> dict[str, int]:
    """Local elements of weights, gradients and optimizer state after one step of the
    FSDP engine on the tiny LLaMA (vocab 512)."""
    from launcher.capabilities import plan_run
    from launcher.distributed import DistInfo
    from launcher.engines import build_engine
    from lotus_dist.model import MODEL_SIZES

    cfg = _memory_config(world)
    model_cfg = dataclasses.replace(MODEL_SIZES["tiny"], vocab_size=512, max_seq_len=16)
    rank = torch.distributed.get_rank() if world > 1 else 0
    cpu = torch.device("cpu")
    engine = build_engine(cfg, model_cfg, DistInfo(rank, world, 0, cpu),
                          plan_run(cfg, world, True, cpu))
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with engine.micro_batch(last=True):
        logits = engine.model(tokens[:, :-1])
        engine.backward(nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    params = list(engine.model.parameters())

    def numel(ts):
        return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in ts)

    counts = {"weights": numel(params), "gradients": numel(p.grad for p in params)}
    engine.optimizer_step()
    state = [v for s in engine.optimizer.state.values() for k, v in s.items()
             if torch.is_tensor(v) and k != "basis"]
    counts["optimizer_state"] = numel(state)
    counts["bases"] = numel(s["basis"] for s in engine.optimizer.state.values() if "basis" in s)
    return counts


# --------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, options in SCENARIOS.items():
        model = Toy()
        model.init_weights()
        opt = make_optimizer(model, options)
        out[name] = train(model, opt, range(STEPS))
        out[name]["final"] = snapshot(model, opt)
    out["memory"] = _engine_memory(1)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[int, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("fsdp-optim")
    runs = {}
    for world in (2, 4):  # 2 first: it writes the checkpoint that 4 resumes from
        mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world)
        runs[world] = [torch.load(out / f"{world}-rank{r}.pt", weights_only=True)
                       for r in range(world)]
    return runs


# --------------------------------------------------------------------- tests


def test_toy_covers_every_sharding_case():
    for world in (2, 4):
        dims = {lotus_shard_dim(s, projection_side(s, "std"), world) for s in SHAPES.values()}
        assert dims == {0, 1}
    assert SHAPES["fallback_proj"][1] % 2 and SHAPES["odd_proj"][1] % 4


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_placements_follow_the_kept_dimension(sharded, world):
    got = sharded[world][0]["shard_dims"]
    for name, shape in SHAPES.items():
        assert got[f"maps.{name}.weight"] == lotus_shard_dim(shape, projection_side(shape, "std"),
                                                             world)
    if world == 4:
        assert sharded[4][3]["local_shapes"]["maps.uneven_proj.weight"] == (0, 6)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_n_ranks_equal_one_rank(single, sharded, world, scenario):
    ref = single[scenario]
    for got in (r[scenario] for r in sharded[world]):
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert got["refreshes"] == ref["refreshes"]  # the same matrices at the same steps
        for key, value in ref["final"].items():
            torch.testing.assert_close(got["final"][key], value, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert max(ref["refreshes"][-1].values()) >= 3  # refreshes did happen


@pytest.mark.slow
def test_resume_on_another_world_size_continues_the_run(single, sharded):
    """2 ranks save at step 4 (odd_proj sharded on dim 1), 4 ranks load it (odd_proj now
    on the dim-0 fallback with replicated moments) and finish as one process would."""
    ref = single["lotus"]
    for got in (r["resumed"] for r in sharded[4]):
        assert got["losses"] == pytest.approx(ref["losses"][RESUME_AT:], rel=1e-5)
        assert got["refreshes"] == ref["refreshes"][RESUME_AT:]
        for key, value in ref["final"].items():
            torch.testing.assert_close(got["final"][key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_rank_dependent_statistics_still_give_one_decision(sharded, world):
    ranks = [r["perturbed"] for r in sharded[world]]
    votes = [r["local_votes"] for r in ranks]
    assert any(v != votes[0] for v in votes[1:])  # alone, the ranks would disagree
    for r in ranks[1:]:
        assert r["refreshes"] == ranks[0]["refreshes"]
        assert r["losses"] == ranks[0]["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_consistency_check_names_the_corrupted_basis(sharded, world):
    for r in sharded[world]:
        message = r["consistency_error"]
        assert message is not None and "maps.odd_proj.weight" in message
        assert f"rank(s) [{world - 1}]" in message


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_memory_per_rank_falls_as_one_over_world_size(single, sharded, world):
    one = single["memory"]
    for r in sharded[world]:
        got = r["memory"]
        for kind in ("weights", "gradients", "optimizer_state", "bases"):
            assert got[kind] * world == one[kind], kind  # tiny's sizes divide 2 and 4



@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_whole_bases_give_the_same_run_as_sharded_ones(sharded, world):
    for r in sharded[world]:
        whole, rows = r["whole_bases"], r["lotus"]
        assert not whole["distributed"]
        assert whole["losses"] == rows["losses"] and whole["refreshes"] == rows["refreshes"]
        for key, value in rows["final"].items():
            assert torch.equal(whole["final"][key], value), key
