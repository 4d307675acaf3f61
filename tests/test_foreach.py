"""Per-tensor overheads of the optimizer step: foreach kernels do the same arithmetic as
the per-tensor loop, and a step's host syncs do not grow with the number of matrices."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.bench.optimizer import count_host_syncs, syncs_per_check_step
from launcher.bench.optimizer import main as bench_main
from lotus_dist import LotusAdamW


def _train(foreach: bool, switch: str, moments: str) -> tuple[list[torch.Tensor], dict]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 12), (24, 12), (12, 30), (16, 16)]
    weights = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    others = [torch.nn.Parameter(torch.randn(7, generator=gen)),
              torch.nn.Parameter(torch.randn(3, 5, generator=gen))]
    # two projected groups with different options, and a plain AdamW group
    groups = [{"params": weights[:2], "rank": 4, "switch": switch, "verify_gap": 2,
               "gamma": 0.5, "moments": moments},
              {"params": weights[2:], "rank": 3, "projection": "svd", "switch": "fixed",
               "update_proj_gap": 3, "scale": 0.5, "lr": 2e-2, "weight_decay": 0.1},
              {"params": others, "betas": (0.8, 0.99)}]
    opt = LotusAdamW(groups, lr=1e-2, weight_decay=0.01, seed=3, foreach=foreach)
    params = weights + others
    for step in range(12):
        grads = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
        opt.step()
    return [p.detach().clone() for p in params], opt.telemetry()


@pytest.mark.parametrize(("switch", "moments"), [("displacement", "keep"),
                                                 ("momentum_displacement", "rotate"),
                                                 ("fixed", "reset")])
def test_foreach_updates_equal_the_loop_bitwise(switch, moments):
    loop, loop_telemetry = _train(False, switch, moments)
    fused, fused_telemetry = _train(True, switch, moments)
    for a, b in zip(loop, fused, strict=True):
        assert torch.equal(a, b)
    assert repr(fused_telemetry) == repr(loop_telemetry)  # NaN where no interval yet
    assert sum(t["refresh_count"] for t in loop_telemetry.values()) > len(loop_telemetry)


def test_bench_optimizer_prints_one_json_line(capsys):
    bench_main(["--counts", "4,8", "--steps", "3"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "optimizer"
    assert [r["matrices"] for r in record["rows"]] == [4, 8]
    assert all(r["loop_s"] > 0 and r["foreach_s"] > 0 for r in record["rows"])


def test_host_syncs_per_step_do_not_grow_with_the_matrix_count():
    """One sync for the finite check and one for all switch decisions (224 matrices
    used to mean 225 on a verify step, each a wait for the GPU)."""
    assert syncs_per_check_step(4, (16, 8), 2) == syncs_per_check_step(224, (16, 8), 2) == 2


def test_the_sync_counter_counts_host_copies():
    t = torch.ones(3)
    with count_host_syncs() as syncs:
        float(t.sum())
        t.tolist()
        bool(t.all())
    assert syncs[0] == 3
    assert float(t.sum()) == 3.0  # the methods are restored


@pytest.mark.parametrize("count", [4, 32])
def test_recovery_norms_share_one_host_copy(count):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(16, 8, generator=gen)) for _ in range(count)]
    opt = LotusAdamW([{"params": weights, "rank": 2, "switch": "fixed",
                       "update_proj_gap": 100, "recovery_scaling": True}])
    for _ in range(2):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=gen)
        with count_host_syncs() as syncs:
            opt.step()
    # the finite check, the recovery norms (the fixed switch checks only at refreshes)
    assert syncs[0] == 2
