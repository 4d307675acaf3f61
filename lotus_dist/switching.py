"""When to refresh a projection basis: fixed interval, displacement (Lotus), path efficiency.

A policy works in two halves so that distributed runs decide identically on every rank:

1. ``stats(...)`` returns the *local partial sums* it needs this step (norms and inner
   products are sums over a matrix's elements, so over shards too), or ``None``;
2. the optimizer sums the stats of all matrices in one reduce (identity in one process),
   copies the result to the host once, and hands each matrix its reduced values (a list
   of floats) to ``decide(...)``.

``decide`` only sets ``state["refresh_pending"]``; the refresh itself happens on the
next step, as in Lotus Algorithm 2. ``state["steps_since_refresh"]`` is Algorithm 2's
T: 1 on the step a basis is computed, +1 on every later step. ``on_refresh`` runs when a
new basis is installed (before the step's ``stats``), with a generator that is a pure
function of (seed, parameter index, refresh count).

Every policy reports the captured energy ||R||/||G|| on its check steps and the value
its rule compares (``switch_metric``) for telemetry. docs/algorithm.md derives the rules
and their bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lotus_dist.comm import partial_dot
from lotus_dist.precision import upcast
from lotus_dist.projection import orthogonal_sketch

State = dict[str, Any]
Group = dict[str, Any]

#: Columns of path efficiency's sketch of the energy outside the basis (exact where the
#: complement is at most this wide; otherwise relative error about sqrt(2 / width)).
PATH_SKETCH_WIDTH = 128


class ConsumedGrad:
    """One matrix's gradient as the update consumes it this step (after clipping).

    ``tensor`` is ``p.grad`` (this rank's shard where it is sharded), or None where no
    rank holds the consumed gradient (low-rank DDP). ``project(basis)`` gives its
    coordinates in another basis on the same side, laid out and reduced like R; the
    result is cached, so ``stats`` and ``decide`` of one step share one projection.
    """

    def __init__(self, tensor: torch.Tensor | None,
                 project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.tensor = tensor
        self._project = project
        self._cache: dict[int, torch.Tensor] = {}

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        if self._project is None:
            raise RuntimeError("this gradient cannot be projected here (low-rank DDP)")
        if id(basis) not in self._cache:
            self._cache[id(basis)] = self._project(basis)
        return self._cache[id(basis)]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """This rank's partial sum of <a, b> (shards of a DTensor add up, replicas do not)."""
    return partial_dot(a, b)


def _sq(a: torch.Tensor) -> torch.Tensor:
    return _dot(a, a)


def _record_energy(state: State, r_sq: float, g_sq: float) -> None:
    state["energy"] = math.sqrt(r_sq / g_sq) if g_sq > 0 else math.nan


def _grad_sq(grad: ConsumedGrad, like: torch.Tensor) -> torch.Tensor:
    """||G||^2, or NaN where no rank holds the consumed gradient (low-rank DDP)."""
    g = grad.tensor
    return _sq(upcast(g)) if g is not None else torch.full((), math.nan, device=like.device)


def _unit_displacement(dot: float, sq_a: float, sq_b: float) -> float:
    """||a/|a| - b/|b|||_F from <a, b>, ||a||^2 and ||b||^2 (0 where either is zero)."""
    denom = math.sqrt(sq_a * sq_b)
    cos = dot / denom if denom > 0 else 1.0
    return math.sqrt(max(2.0 - 2.0 * cos, 0.0))


class _Policy:
    def on_refresh(self, group: Group, state: State, generator: torch.Generator) -> None:
        """A new basis is in ``state["basis"]``; nothing to prepare by default."""


class FixedSwitch(_Policy):
    """GaLore: refresh every ``update_proj_gap`` steps."""

    def stats(self, group: Group, state: State, r: torch.Tensor, grad: ConsumedGrad):
        t = state["steps_since_refresh"]
        if t == 1 or t == group["update_proj_gap"]:
            return torch.stack([_sq(r), _grad_sq(grad, r)])
        return None

    def decide(self, group: Group, state: State, r, grad, stats: list[float] | None) -> None:
        if stats is not None:
            _record_energy(state, stats[0], stats[1])
        if state["steps_since_refresh"] >= group["update_proj_gap"]:
            state["refresh_pending"] = True


class DisplacementSwitch(_Policy):
    """Lotus Algorithm 2: average displacement of the unit low-rank gradient.

    With d = R / ||R||_F, every ``verify_gap`` steps the average displacement since the
    refresh is ||d_cur - d_init||_F / T; below ``gamma`` (and T >= ``min_gap``) the
    subspace has stopped moving the gradient and is refreshed. Because both are unit
    vectors, ||d_cur - d_init||^2 = 2 - 2 <R, R_0> / (||R|| ||R_0||): the state keeps the
    raw R_0 and every quantity is a sum of local partial sums.

    The numerator is at most 2, so the check passes by T = 2 / gamma whatever the
    gradients do, and near sqrt(2) / gamma when consecutive unit gradients are nearly
    orthogonal (noise): on noisy gradients this is a fixed interval in disguise.
    ``MomentumDisplacementSwitch`` is the noise-robust variant.
    """

    def stats(self, group: Group, state: State, r: torch.Tensor, grad: ConsumedGrad):
        t = state["steps_since_refresh"]
        if t == 1:
            state["r_init"] = r.clone()
            return torch.stack([_sq(r), _grad_sq(grad, r)])
        if t % group["verify_gap"] == 0:
            r0 = state["r_init"]
            return torch.stack([_sq(r), _grad_sq(grad, r), _dot(r, r0), _sq(r0)])
        return None

    def decide(self, group: Group, state: State, r, grad, stats: list[float] | None) -> None:
        if stats is None:
            return
        s = stats
        _record_energy(state, s[0], s[1])
        if len(s) == 2:
            return
        t = state["steps_since_refresh"]
        displacement = _unit_displacement(s[2], s[0], s[3]) / t
        state["switch_metric"] = displacement
        if displacement < group["gamma"] and t >= group["min_gap"]:
            state["refresh_pending"] = True


class MomentumDisplacementSwitch(_Policy):
    """Algorithm 2's test on the low-rank first moment, per window (noise-robust variant).

    d = M / ||M||_F with M Adam's low-rank first moment after this step's gradient,
    M = beta1 m + (1 - beta1) R (the moment the update is about to use). Every
    ``verify_gap`` steps the displacement per step over the last window,
    ||d_cur - d_prev||_F / (steps since d_prev), is compared with ``gamma`` (and
    T >= ``min_gap``); d_prev is the direction at the previous check (at the refresh for
    the first one).

    Two changes from Algorithm 2, both needed: the moment averages noise over about
    1 / (1 - beta1) steps, and the window replaces "since the refresh", which removes the
    bound ||d_cur - d_init|| / T <= 2 / T that makes Algorithm 2 fire on pure noise. On
    zero-mean noise the moment's direction keeps moving, about sqrt(2 (1 - beta1^eta)) per
    window, so the rule does not fire; a gradient whose smoothed direction moves by less
    than ``gamma`` per step still does, as in Algorithm 2. (The direction of M alone,
    measured since the refresh, would not help: on noise it decorrelates from d_init
    within ~2 / (1 - beta1) steps and hits the same 2 / T bound.)
    """

    def stats(self, group: Group, state: State, r: torch.Tensor, grad: ConsumedGrad):
        t = state["steps_since_refresh"]
        if t == 1:
            state["m_ref"] = _next_moment(group, state, r)
            state["m_ref_step"] = 1
            return torch.stack([_sq(r), _grad_sq(grad, r)])
        if t % group["verify_gap"] == 0:
            m, ref = _next_moment(group, state, r), state["m_ref"]
            return torch.stack([_sq(r), _grad_sq(grad, r), _dot(m, ref), _sq(m), _sq(ref)])
        return None

    def decide(self, group: Group, state: State, r, grad, stats: list[float] | None) -> None:
        if stats is None:
            return
        s = stats
        _record_energy(state, s[0], s[1])
        if len(s) == 2:
            return
        t = state["steps_since_refresh"]
        metric = _unit_displacement(s[2], s[3], s[4]) / (t - state["m_ref_step"])
        state["switch_metric"] = metric
        state["m_ref"] = _next_moment(group, state, r)
        state["m_ref_step"] = t
        if metric < group["gamma"] and t >= group["min_gap"]:
            state["refresh_pending"] = True


def _next_moment(group: Group, state: State, r: torch.Tensor) -> torch.Tensor:
    """beta1 m + (1 - beta1) R: the low-rank first moment once this step's R is in."""
    beta1 = group["betas"][0]
    if "exp_avg" not in state:
        return r * (1.0 - beta1)
    return state["exp_avg"] * beta1 + r * (1.0 - beta1)


class PathEfficiencySwitch(_Policy):
    """Lotus eq. (5): rho = ||sum P g_hat|| / ||sum g_hat|| over the last ``verify_gap`` steps.

    g_hat = G / ||G||. P is an orthogonal projector, so the denominator splits exactly:
    ||sum g_hat||^2 = ||sum P g_hat||^2 + ||sum (I - P) g_hat||^2. The first term is kept
    exactly, as a low-rank accumulator of the coordinates R / ||G||. The second is kept
    through a fixed sketch S of the complement (``orthogonal_sketch``, drawn at each
    refresh): the accumulator of the coordinates of G in S, whose squared norm estimates
    the energy outside the basis without bias (exactly where the complement has at most
    ``PATH_SKETCH_WIDTH`` dimensions). Memory per matrix: R's size plus
    (m or n) x width twice, instead of a full-size accumulator. Their norms after adding
    this step's term follow from partial sums,
    ||S + x/a||^2 = ||S||^2 + 2 <S, x>/a + ||x||^2/a^2, so one reduce per step suffices.
    Refresh when rho < ``gamma`` and T >= ``min_gap``; the window restarts at every check.
    """

    def on_refresh(self, group: Group, state: State, generator: torch.Generator) -> None:
        state["path_sketch"] = orthogonal_sketch(state["basis"], PATH_SKETCH_WIDTH, generator)

    def stats(self, group: Group, state: State, r: torch.Tensor, grad: ConsumedGrad):
        if grad.tensor is None:
            raise RuntimeError("switch=path_efficiency needs the full gradient on every rank; "
                               "it is not available with low-rank DDP communication")
        y = grad.project(state["path_sketch"])
        if state["steps_since_refresh"] == 1 or "sum_unit_lr" not in state:
            state["sum_unit_lr"] = torch.zeros_like(r)
            state["sum_unit_out"] = torch.zeros_like(y)
        s_lr, s_out = state["sum_unit_lr"], state["sum_unit_out"]
        return torch.stack([_sq(r), _grad_sq(grad, r), _dot(s_lr, r), _sq(s_lr),
                            _dot(s_out, y), _sq(s_out), _sq(y)])

    def decide(self, group: Group, state: State, r, grad, stats: list[float] | None) -> None:
        r_sq, g_sq, lr_dot, lr_sq, out_dot, out_sq, y_sq = stats
        if g_sq <= 0:
            return
        a = math.sqrt(g_sq)
        state["sum_unit_lr"].add_(r, alpha=1.0 / a)
        state["sum_unit_out"].add_(grad.project(state["path_sketch"]), alpha=1.0 / a)
        t = state["steps_since_refresh"]
        if t % group["verify_gap"] != 0:
            return
        _record_energy(state, r_sq, g_sq)
        inside = max(lr_sq + 2.0 * lr_dot / a + r_sq / g_sq, 0.0)
        outside = max(out_sq + 2.0 * out_dot / a + y_sq / g_sq, 0.0)
        total = inside + outside
        rho = math.sqrt(inside / total) if total > 0 else 1.0
        state["switch_metric"] = rho
        state["sum_unit_lr"].zero_()
        state["sum_unit_out"].zero_()
        if rho < group["gamma"] and t >= group["min_gap"]:
            state["refresh_pending"] = True


SWITCH_POLICIES = {
    "fixed": FixedSwitch(),
    "displacement": DisplacementSwitch(),
    "momentum_displacement": MomentumDisplacementSwitch(),
    "path_efficiency": PathEfficiencySwitch(),
}
