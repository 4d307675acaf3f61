"""LR schedule: linear warmup to the peak, cosine down to lr * min_lr_ratio."""

import itertools
import math

import pytest
import torch

from launcher.config import ConfigWarning, load_config
from launcher.schedule import build_lr_scheduler, lr_factor


def test_warmup_is_linear_and_reaches_the_peak_on_its_last_step():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(4)]
    assert factors == [0.25, 0.5, 0.75, 1.0]


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.1) == 1.0


def test_cosine_ends_at_the_min_ratio_and_stays_there():
    args = {"warmup_steps": 10, "total_steps": 100, "min_lr_ratio": 0.2}
    assert lr_factor(100, **args) == pytest.approx(0.2)
    assert lr_factor(150, **args) == pytest.approx(0.2)
    assert lr_factor(55, **args) == pytest.approx(0.6)  # halfway: (1 + 0.2) / 2


def test_cosine_decreases_monotonically_after_warmup():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(factors))
    assert factors[0] == 1.0


def test_scheduler_sets_the_optimizer_lr_each_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.5)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.02 * lr_factor(s, 2, 6, 0.5) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_state_dict_resumes_at_the_same_step():
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_lr_scheduler(optimizer, 3, 30, 0.1)

    optimizer, scheduler = make()
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed = make()
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    optimizer.step()
    scheduler.step()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(lr_factor(8, 3, 30, 0.1))
    assert math.isclose(resumed.get_last_lr()[0], scheduler.get_last_lr()[0])


def lrs_of(overrides: list[str]) -> list[float]:
    """The lr of every step of the schedule the config builds (peak 1)."""
    t = load_config(None, ["optim.lr=1.0", *overrides]).training
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    lrs = []
    for _ in range(t.steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return lrs


def test_a_warmup_fraction_warms_up_over_that_share_of_the_steps():
    lrs = lrs_of(["training.steps=40", "training.warmup_steps=0.1"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # 4 = 10% of 40 steps
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))


def test_a_smoke_run_of_a_long_warmup_still_decays():
    with pytest.warns(ConfigWarning, match="warming up for 3 steps"):
        lrs = lrs_of(["training.steps=30", "training.warmup_steps=1000"])
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[-1] == pytest.approx(lr_factor(29, 3, 30, 0.1))
    assert lrs[-1] < 0.2
