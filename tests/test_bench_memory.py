"""`lotus-train bench memory`: the derived optimizer state is the state the optimizers
create (one process and FSDP shards), and the per-rank accounting meets issue 11."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from launcher.bench.memory import (
    METHODS,
    check_against_real_step,
    derived_layout,
    measure,
    method_config,
    model_config,
    one_thread,
    per_rank_usage,
)
from launcher.cli import main
from launcher.config import PROJECTED_OPTIMIZERS
from launcher.engines.fsdp import parallelize_llama
from launcher.optimizer import build_optimizer
from lotus_dist.fsdp import FSDPComm, lotus_shard_placement, projected_sides
from lotus_dist.model import build_model_on_meta

BY_LABEL = {m.label: m for m in METHODS}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.label)
def test_derived_state_equals_a_real_step(method):
    check = check_against_real_step(method)
    assert check["problems"] == []
    assert check["state"] > 0


def test_per_layer_keeps_one_gradient_at_a_time():
    check = check_against_real_step(BY_LABEL["lotus_per_layer"])
    largest = 4096 * 128 * 4  # tiny's embedding (and head): 4096 ids x dim 128, fp32
    assert check["grads"] == largest < check["params"] / 3


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


@one_thread()
def _fsdp_step_bytes(label: str, world: int) -> tuple[int, int, int]:
    """(weights, gradients, state) bytes of rank 0 after one step of tiny under FSDP2 on
    a fake process group of ``world`` ranks (collectives do nothing; shapes are real)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = method_config("tiny", BY_LABEL[label])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = build_model_on_meta(model_config(cfg))
        o = cfg.optim
        sides = (projected_sides(model, o.rank, o.target_modules, o.proj_type)
                 if o.name in PROJECTED_OPTIMIZERS else {})
        parallelize_llama(model, mesh, lotus_shard_placement(sides, world),
                          MixedPrecisionPolicy(), activation_checkpointing=False)
        model.to_empty(device="cpu")
        model.init_weights(0)
        optimizer = build_optimizer(o, model, seed=0, comm=FSDPComm(mesh))
        model(torch.randint(0, model.cfg.vocab_size, (2, 16))).mean().backward()
        optimizer.step()
        params = list(model.parameters())
        state = sum(_local_bytes(v) for p in params for v in optimizer.state[p].values()
                    if torch.is_tensor(v))
        return (sum(_local_bytes(p) for p in params), sum(_local_bytes(p.grad) for p in params),
                state)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [8, 64])  # 64 does not divide 352: the dim-0 fallback
@pytest.mark.parametrize("label", ["adamw", "galore", "lotus"])
def test_fsdp_per_rank_bytes_equal_a_sharded_step(label, world):
    layouts = derived_layout(method_config("tiny", BY_LABEL[label])).values()
    u = per_rank_usage(layouts, per_layer=False, engine="fsdp", world=world)
    assert (u.params, u.grads, u.state) == _fsdp_step_bytes(label, world)


def test_fsdp_per_rank_bytes_fall_as_one_over_w():
    usage, _ = measure(["7b"], [BY_LABEL["adamw"], BY_LABEL["lotus"]], ["fsdp"], [8, 64])
    adamw8, adamw64 = usage["7b", "fsdp", 8, "adamw"], usage["7b", "fsdp", 64, "adamw"]
    assert adamw8.resident / adamw64.resident == pytest.approx(8, rel=0.01)
    lotus8, lotus64 = usage["7b", "fsdp", 8, "lotus"], usage["7b", "fsdp", 64, "lotus"]
    # bases shard by rows too: nothing is whole on every rank at 7b (its dims divide 64)
    assert lotus8.whole_state == lotus64.whole_state == 0
    assert lotus8.resident / lotus64.resident == pytest.approx(8, rel=0.01)


def test_7b_lotus_per_layer_meets_the_target():
    usage, _ = measure(["7b"], [BY_LABEL["adamw"], BY_LABEL["lotus_per_layer"]], ["ddp"], [1])
    ratio = usage["7b", "ddp", 1, "lotus_per_layer"].grads_state / \
        usage["7b", "ddp", 1, "adamw"].grads_state
    assert ratio <= 0.35


def test_workspace_is_the_largest_matrix_refresh():
    usage, _ = measure(["7b"], [BY_LABEL["galore"], BY_LABEL["lotus"]], ["ddp"], [1])
    m, n, k, width = 11008, 4096, 4096, 1024 + 8  # the MLP's (11008, 4096), rank + oversample
    assert usage["7b", "ddp", 1, "lotus"].workspace == (m + n) * width * 4 + width**2 * 8
    assert usage["7b", "ddp", 1, "galore"].workspace == (m * n + m * k + k + k * n) * 4


def test_cli_prints_one_json_line(capsys):
    main(["bench", "memory", "--sizes", "tiny,7b", "--methods", "adamw,lotus,lotus_per_layer",
          "--world-sizes", "1,8,64"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bench"] == "memory"
    assert len(report["rows"]) == 2 * (2 * 2 * 3 + 2)  # per_layer rows at W = 1 only
    assert all(c["problems"] == [] for c in report["check"])
    assert report["targets"]["per_layer_vs_adamw"]["pass"] is True
    assert report["targets"]["fsdp_scaling"]["adamw"]["pass"] is True
