"""Per-layer mode checks finiteness on the device: a non-finite gradient leaves its
parameter exactly as a step without that gradient would, and a step reads every flag
in one host copy instead of one per parameter."""

from __future__ import annotations

import pytest
import torch

from launcher.bench.optimizer import count_host_syncs
from lotus_dist import LotusAdamW
from lotus_dist.optim import NonFiniteGradientError

SHAPES = [(16, 8), (8, 12), (16, 8), (12, 12)]


def _model(count: int = len(SHAPES)) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    shapes = (SHAPES * count)[:count]
    weights = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    plain = [torch.nn.Parameter(torch.randn(8, generator=gen))]
    return weights, plain


def _optimizer(weights, plain, *, switch: str = "fixed", **kwargs) -> LotusAdamW:
    groups = [{"params": weights, "rank": 3, "switch": switch, "update_proj_gap": 100,
               "verify_gap": 4, "gamma": 1e-9},
              {"params": plain, "weight_decay": 0.1}]
    opt = LotusAdamW(groups, lr=1e-2, seed=5, per_layer=True, **kwargs)
    opt.register_per_layer_hooks()
    return opt


def _backward(weights, plain, step: int, *, absent=None) -> None:
    """A loss whose gradient reaches every parameter except ``absent``."""
    gen = torch.Generator().manual_seed(100 + step)
    loss = torch.zeros(())
    for p in weights + plain:
        x = torch.randn(p.shape, generator=gen)  # drawn for every p: same data either way
        if p is not absent:
            loss = loss + (p * x).sum() ** 2 / p.numel()
    loss.backward()


def _poison(p: torch.Tensor, value: float = float("nan")):
    """Put ``value`` into row 0 of every gradient of ``p`` until the handle is removed."""
    return p.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), value))


def _run(target: str, mode: str, steps: int = 8, bad_step: int = 5, switch: str = "fixed"):
    weights, plain = _model()
    opt = _optimizer(weights, plain, switch=switch)
    victim = weights[1] if target == "projected" else plain[0]
    for step in range(1, steps + 1):
        if step == bad_step and mode == "nan":
            handle = _poison(victim)
            _backward(weights, plain, step)
            handle.remove()
        else:
            _backward(weights, plain, step, absent=victim if step == bad_step else None)
        opt.step()
    return [p.detach().clone() for p in weights + plain], opt


@pytest.mark.parametrize("switch", ["fixed", "displacement"])
@pytest.mark.parametrize("target", ["projected", "plain"])
def test_a_nonfinite_gradient_is_a_step_without_that_gradient(target, switch):
    poisoned, opt_a = _run(target, "nan", switch=switch)
    skipped, opt_b = _run(target, "absent", switch=switch)
    for a, b in zip(poisoned, skipped, strict=True):
        assert torch.equal(a, b)
    assert opt_a.skipped_steps == 1 and opt_b.skipped_steps == 0
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values(), strict=True):
        assert sa["step"] == sb["step"]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert sa.get("steps_since_refresh") == sb.get("steps_since_refresh")


def test_a_nonfinite_gradient_on_a_refresh_step_never_reaches_the_rsvd():
    weights, plain = _model()
    opt = _optimizer(weights, plain)
    _poison(weights[0])
    _backward(weights, plain, 1)
    opt.step()
    assert "basis" not in opt.state[weights[0]]  # skipped before its first refresh
    assert "basis" in opt.state[weights[1]]
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("count", [4, 32])
def test_a_step_reads_every_finite_flag_in_one_host_copy(count):
    weights, plain = _model(count)
    opt = _optimizer(weights, plain)
    for step in range(1, 4):
        _backward(weights, plain, step)  # the hooks update inside backward
        with count_host_syncs() as syncs:
            opt.step()
    assert syncs[0] == 1  # it was one per parameter (33 or 5 here)


def test_raise_mode_raises_when_the_flags_are_read():
    weights, plain = _model()
    opt = _optimizer(weights, plain, nonfinite="raise")
    _backward(weights, plain, 1)
    opt.step()
    before = weights[2].detach().clone()
    _poison(weights[2], float("inf"))
    _backward(weights, plain, 2)
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        opt.settle_nonfinite()
    assert torch.equal(weights[2].detach(), before)  # never moved
