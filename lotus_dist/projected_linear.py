"""Projected backward: a linear layer whose backward yields R, the low-rank gradient of its
weight, straight from the activations, so the full gradient G is never formed.

For y = x W^T (W is m x n, x holds T tokens of n features, dy their T x m output
gradients), G = dy^T x, hence

* right projection (basis Q, n x r): R = G Q = dy^T (x Q). The forward saves x Q
  (T x r) for the weight instead of x, the activation saving RSO is built on;
* left projection (basis P, m x r): R = P^T G = (dy P)^T x.

Either costs 2 T r (m + n) flops against 2 T m n for G plus 2 m n r to project it. The
input gradient dy W is computed as usual. A ``ProjectionSite`` per targeted linear says
what its backward produces this step: R in the current basis, or, when the basis is
due for a refresh (the optimizer knows a step ahead), the whole G as ``weight.grad``.
R is summed over the micro-batches of a step; the optimizer takes the sum at the step
(``take``), and a consumer that reduces it across ranks during backward (the low-rank DDP
reducer) is called with the running sum after every micro-batch (``on_ready``) and acts
on the last one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: (basis, side, rank) a site's backward projects with, or None for the whole gradient.
#: ``basis()`` returns the whole d x rank basis each time it is called: under FSDP it
#: gathers a row-sharded one, so it is called where it is used (the forward for a right
#: projection, the backward for a left one) and not kept for the step.
Projection = tuple[Callable[[], torch.Tensor], str, int] | None


class ProjectionSite:
    """The weight-gradient side of one projected linear for the current step.

    Args:
        name: the weight's name, for errors.
        weight: the (m x n) weight.
        plan: called at the first forward of a step: the (basis, side, rank) to project
            with, or None when the step needs the whole gradient (a refresh).
    """

    def __init__(self, name: str, weight: torch.Tensor,
                 plan: Callable[[], Projection]) -> None:
        self.name, self.weight, self._plan = name, weight, plan
        self._projection: Projection = None
        self._planned = False
        self.lowrank: torch.Tensor | None = None
        #: Called with (site, R summed so far) after each micro-batch's backward.
        self.on_ready: Callable[[ProjectionSite, torch.Tensor], None] | None = None
        #: Applied to each micro-batch's R before it is summed (FSDP: a reduce-scatter
        #: to this rank's shard, so that a rank never holds every matrix's whole R).
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def projection(self) -> Projection:
        """This step's projection, fixed at its first forward for every micro-batch."""
        if not self._planned:
            self._projection, self._planned = self._plan(), True
        return self._projection

    def accumulate(self, r: torch.Tensor) -> None:
        """Add one micro-batch's R; a wrong shape or device is a bug upstream, and fails
        here rather than as a silently wrong update."""
        _, side, rank = self._projection
        m, n = self.weight.shape
        want = (rank, n) if side == "left" else (m, rank)
        device = self.weight.device
        if tuple(r.shape) != want or r.device != device:
            raise ValueError(f"projected backward of {self.name}: R of shape {tuple(r.shape)} "
                             f"on {r.device}, expected {want} on {device} ({side} "
                             f"projection of a {m} x {n} weight at rank {rank})")
        if self.reduce is not None:
            r = self.reduce(r)
        self.lowrank = r if self.lowrank is None else self.lowrank.add_(r)
        if self.on_ready is not None:
            self.on_ready(self, self.lowrank)

    def take(self) -> torch.Tensor | None:
        """The step's summed R (None if the step formed the whole gradient), and start
        the next step: its first forward plans again."""
        r, self.lowrank, self._planned = self.lowrank, None, False
        return r


def linear_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute in on ``x``: autocast's if enabled, else x's.
    The custom linears here and in ``lotus_dist.rso`` run their matmuls in it with
    autocast off, as the op they replace would."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _ProjectedLinear(torch.autograd.Function):
    """y = x W^T whose backward gives dx, and R (or G) for W through the site.

    Under autocast the matmuls run in the autocast dtype, as ``F.linear``'s would; R is
    handed on in the compute dtype (fp32, or fp64 in an fp64 run).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                site: ProjectionSite) -> torch.Tensor:
        kind, dtype = x.device.type, linear_compute_dtype(x)
        projection = site.projection()
        ctx.site, ctx.projection, ctx.dtype, ctx.x_dtype = site, projection, dtype, x.dtype
        with torch.autocast(kind, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            if projection is None or projection[1] == "left":
                ctx.save_for_backward(xc, weight)
            else:  # right: only x Q (T x r) is kept for the weight, not x (T x n)
                ctx.save_for_backward(xc @ projection[0]().to(dtype), weight)
            return xc @ wc.T

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, weight = ctx.saved_tensors
        dy = dy.to(ctx.dtype)
        dx = (dy @ weight.to(ctx.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dy2 = dy.reshape(-1, dy.shape[-1])
        act = saved.reshape(-1, saved.shape[-1])
        if ctx.projection is None:
            return dx, (dy2.T @ act).to(weight.dtype), None
        basis, side, _ = ctx.projection
        r = dy2.T @ act if side == "right" else (dy2 @ basis().to(ctx.dtype)).T @ act
        ctx.site.accumulate(r.to(torch.promote_types(r.dtype, torch.float32)))
        return dx, None, None


def projected_linear(x: torch.Tensor, weight: torch.Tensor, site: ProjectionSite) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) with the projected backward of ``site``."""
    return _ProjectedLinear.apply(x, weight, site)


def install_projected_backward(model: nn.Module, params: list[torch.Tensor],
                               plan: Callable[[torch.Tensor], Projection]
                               ) -> dict[torch.Tensor, ProjectionSite]:
    """Give every bias-free ``nn.Linear`` of ``model`` whose weight is in ``params`` a
    projected backward (its forward is replaced on the instance; names, state dicts and
    checkpoints are unchanged). ``plan(weight)`` is the optimizer's projection for this
    step. Returns the sites by weight."""
    wanted = {id(p) for p in params}
    sites: dict[torch.Tensor, ProjectionSite] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) not in wanted:
            continue
        if module.bias is not None:
            raise ValueError(f"optim.projected_backward: {name} has a bias; the projected "
                             "linear covers bias-free layers (LLaMA's) only")
        weight = module.weight
        site = ProjectionSite(f"{name}.weight", weight, lambda w=weight: plan(w))
        module.forward = _forward_through(module, site)  # type: ignore[method-assign]
        sites[weight] = site
    missing = len(wanted) - len(sites)
    if missing:
        raise ValueError(f"optim.projected_backward: {missing} projected weight(s) are not the "
                         "weight of an nn.Linear of the model; only linears can project in "
                         "backward")
    return sites


def _forward_through(module: nn.Linear, site: ProjectionSite
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The replacement forward; it reads ``module.weight`` at call time (FSDP swaps in
    the unsharded weight for the forward)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # eval: no backward, nothing to plan or save
            return nn.functional.linear(x, module.weight)
        return projected_linear(x, module.weight, site)
    return forward
