"""When to refresh a projection basis: fixed interval, displacement (Lotus), path efficiency.

A policy works in two halves so that distributed runs decide identically on every rank:

1. ``stats(...)`` returns the *local partial sums* it needs this step (norms and inner
   products are sums over a matrix's elements, so over shards too), or ``None``;
2. the optimizer sums the stats of all matrices in one reduce (identity in one process)
   and hands each matrix its reduced vector to ``decide(...)``.

``decide`` only sets ``state["refresh_pending"]``; the refresh itself happens on the
next step, as in Lotus Algorithm 2. ``state["steps_since_refresh"]`` is Algorithm 2's
T: 1 on the step a basis is computed, +1 on every later step.

Every policy reports the captured energy ||R||/||G|| on its check steps and the value
its rule compares (``switch_metric``) for telemetry.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lotus_dist.comm import partial_dot

State = dict[str, Any]
Group = dict[str, Any]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """This rank's partial sum of <a, b> (shards of a DTensor add up, replicas do not)."""
    return partial_dot(a, b)


def _sq(a: torch.Tensor) -> torch.Tensor:
    return _dot(a, a)


def _record_energy(state: State, r_sq: float, g_sq: float) -> None:
    state["energy"] = math.sqrt(r_sq / g_sq) if g_sq > 0 else math.nan


def _grad_sq(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """||G||^2, or NaN where no rank holds the consumed gradient (low-rank DDP)."""
    return _sq(g.float()) if g is not None else torch.full((), math.nan, device=like.device)


class FixedSwitch:
    """GaLore: refresh every ``update_proj_gap`` steps."""

    def stats(self, group: Group, state: State, r: torch.Tensor, g: torch.Tensor):
        t = state["steps_since_refresh"]
        if t == 1 or t == group["update_proj_gap"]:
            return torch.stack([_sq(r), _grad_sq(g, r)])
        return None

    def decide(self, group: Group, state: State, r, g, stats: torch.Tensor | None) -> None:
        if stats is not None:
            _record_energy(state, float(stats[0]), float(stats[1]))
        if state["steps_since_refresh"] >= group["update_proj_gap"]:
            state["refresh_pending"] = True


class DisplacementSwitch:
    """Lotus Algorithm 2: average displacement of the unit low-rank gradient.

    With d = R / ||R||_F, every ``verify_gap`` steps the average displacement since the
    refresh is ||d_cur - d_init||_F / T; below ``gamma`` (and T >= ``min_gap``) the
    subspace has stopped moving the gradient and is refreshed. Because both are unit
    vectors, ||d_cur - d_init||^2 = 2 - 2 <R, R_0> / (||R|| ||R_0||): the state keeps the
    raw R_0 and every quantity is a sum of local partial sums.
    """

    def stats(self, group: Group, state: State, r: torch.Tensor, g: torch.Tensor):
        t = state["steps_since_refresh"]
        if t == 1:
            state["r_init"] = r.clone()
            return torch.stack([_sq(r), _grad_sq(g, r)])
        if t % group["verify_gap"] == 0:
            r0 = state["r_init"]
            return torch.stack([_sq(r), _grad_sq(g, r), _dot(r, r0), _sq(r0)])
        return None

    def decide(self, group: Group, state: State, r, g, stats: torch.Tensor | None) -> None:
        if stats is None:
            return
        s = stats.double().tolist()
        _record_energy(state, s[0], s[1])
        if len(s) == 2:
            return
        t = state["steps_since_refresh"]
        denom = math.sqrt(s[0] * s[3])
        cos = s[2] / denom if denom > 0 else 1.0
        displacement = math.sqrt(max(2.0 - 2.0 * cos, 0.0)) / t
        state["switch_metric"] = displacement
        if displacement < group["gamma"] and t >= group["min_gap"]:
            state["refresh_pending"] = True


class PathEfficiencySwitch:
    """Lotus eq. (5): rho = ||sum P g_hat|| / ||sum g_hat|| over the last ``verify_gap`` steps.

    g_hat = G / ||G||. The sums are kept as a low-rank accumulator (coordinates of P g_hat)
    and a full-size one (costs one gradient of memory per matrix). Their norms after
    adding this step's term follow from partial sums,
    ||S + x/a||^2 = ||S||^2 + 2 <S, x>/a + ||x||^2/a^2, so one reduce per step suffices.
    Refresh when rho < ``gamma`` and T >= ``min_gap``; the window restarts at every check.
    """

    def stats(self, group: Group, state: State, r: torch.Tensor, g: torch.Tensor | None):
        if g is None:
            raise RuntimeError("switch=path_efficiency needs the full gradient on every rank; "
                               "it is not available with low-rank DDP communication")
        g32 = g.float()
        if state["steps_since_refresh"] == 1 or "sum_unit_lr" not in state:
            state["sum_unit_lr"] = torch.zeros_like(r)
            state["sum_unit_full"] = torch.zeros_like(g32)
        s_lr, s_full = state["sum_unit_lr"], state["sum_unit_full"]
        return torch.stack([_sq(r), _sq(g32), _dot(s_lr, r), _sq(s_lr),
                            _dot(s_full, g32), _sq(s_full)])

    def decide(self, group: Group, state: State, r, g, stats: torch.Tensor | None) -> None:
        r_sq, g_sq, lr_dot, lr_sq, full_dot, full_sq = stats.double().tolist()
        if g_sq <= 0:
            return
        a = math.sqrt(g_sq)
        state["sum_unit_lr"].add_(r, alpha=1.0 / a)
        state["sum_unit_full"].add_(g.float(), alpha=1.0 / a)
        t = state["steps_since_refresh"]
        if t % group["verify_gap"] != 0:
            return
        _record_energy(state, r_sq, g_sq)
        num = lr_sq + 2.0 * lr_dot / a + r_sq / g_sq
        den = full_sq + 2.0 * full_dot / a + 1.0
        rho = math.sqrt(max(num, 0.0) / den) if den > 0 else 1.0
        state["switch_metric"] = rho
        state["sum_unit_lr"].zero_()
        state["sum_unit_full"].zero_()
        if rho < group["gamma"] and t >= group["min_gap"]:
            state["refresh_pending"] = True


SWITCH_POLICIES = {
    "fixed": FixedSwitch(),
    "displacement": DisplacementSwitch(),
    "path_efficiency": PathEfficiencySwitch(),
}
