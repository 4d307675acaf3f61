"""FSDP's dim-0 fallback matrices all-reduce their R in one bucket per step, not one
blocking call each (tiny at 64 ranks: 352 is not divisible, so the MLP's left-projected
matrices fall back). Collectives run on torch's fake process group in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from launcher.bench.memory import METHODS, method_config, model_config
from launcher.engines.fsdp import parallelize_llama
from launcher.optimizer import build_optimizer
from lotus_dist.fsdp import FSDPComm, lotus_shard_placement, projected_sides
from lotus_dist.model import build_model_on_meta
from lotus_dist.projection import projection_side


def test_fallback_low_rank_gradients_share_one_all_reduce(monkeypatch):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 64
    cfg = method_config("tiny", next(m for m in METHODS if m.label == "lotus"))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = build_model_on_meta(model_config(cfg))
        o = cfg.optim
        sides = projected_sides(model, o.rank, o.target_modules, o.proj_type)
        parallelize_llama(model, mesh, lotus_shard_placement(sides, world),
                          MixedPrecisionPolicy(), activation_checkpointing=False)
        model.to_empty(device="cpu")
        model.init_weights(0)
        comm = FSDPComm(mesh)
        optimizer = build_optimizer(o, model, seed=0, comm=comm)
        kinds: list[str] = []
        plain_sum = comm._sum

        def counting_sum(t: torch.Tensor, kind: str) -> torch.Tensor:
            kinds.append(kind)
            return plain_sum(t, kind)

        monkeypatch.setattr(comm, "_sum", counting_sum)
        for _ in range(2):  # the second step refreshes nothing
            kinds.clear()
            model(torch.randint(0, model.cfg.vocab_size, (2, 16))).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        fallback = [p for p in optimizer.projected_params()
                    if not comm.layout(p, projection_side(p.shape, o.proj_type)).kept]
        assert len(fallback) >= 4  # each used to all-reduce its R on its own
        assert kinds.count("lowrank_gradients") == 1
    finally:
        dist.destroy_process_group()
