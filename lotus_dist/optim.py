"""LotusAdamW: AdamW whose projected groups run Adam in a low-rank, adaptively refreshed basis.

The Lotus step for projected matrices reads top to bottom (``prepare`` then ``_update``):
refresh the bases a switch decided on last step, project the gradients, let the switch
policy look at them, run Adam on the low-rank coordinates, add the update back.

Param groups are GaLore-compatible: a group with ``rank`` is projected, with
``update_proj_gap``, ``scale`` and ``proj_type`` meaning what they mean in GaLore, and
``projection="svd", switch="fixed"`` reproduces GaLore's AdamW exactly (including its
update order: Adam step, then decoupled weight decay ``p -= lr * wd * p``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lotus_dist.comm import LocalComm, local_view, partial_dot
from lotus_dist.precision import compute_dtype, no_autocast, upcast, without_autocast
from lotus_dist.projected_linear import Projection, ProjectionSite, install_projected_backward
from lotus_dist.projection import (
    PROJ_TYPES,
    PROJECTIONS,
    REFRESH_BATCH_BYTES,
    add_projected_back,
    align_signs,
    grassmann_step,
    projected_dim,
    projection_side,
    random_basis,
    refresh_generator,
    rsvd_bases,
    rsvd_basis,
    rsvd_batch_size,
)
from lotus_dist.switching import SWITCH_POLICIES, ConsumedGrad

MOMENTS = ("keep", "reset", "rotate")
NONFINITE = ("skip", "raise")

#: Defaults of every group key; a group may override any of them.
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,  # GaLore's AdamW default (from transformers), not torch's 1e-8
    "weight_decay": 0.0,
    "correct_bias": True,
    # GaLore keys (used by groups with ``rank``)
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    # Lotus keys
    "projection": "rsvd",
    "switch": "displacement",
    # None: 0.01 for (momentum_)displacement (paper: 0.005-0.02), 0.5 for path_efficiency
    "gamma": None,
    "verify_gap": 50,
    "min_gap": 0,
    "power_iters": 1,
    "oversample": 8,
    "moments": "keep",
    "recovery_scaling": False,
    "recovery_limiter": 1.01,
    "walk_step": 0.5,
}
_GROUP_KEYS = {*DEFAULTS, "params", "param_names", "rank", "initial_lr"}
_DEFAULT_GAMMA = {"fixed": 0.01, "displacement": 0.01, "momentum_displacement": 0.01,
                  "path_efficiency": 0.5}

class NonFiniteGradientError(RuntimeError):
    """Raised when ``nonfinite="raise"`` and a gradient holds inf or NaN."""


class LotusAdamW(torch.optim.Optimizer):
    """AdamW with Lotus low-rank projection for groups that carry a ``rank``.

    Args:
        params: parameters or GaLore-style param groups (see ``lotus_param_groups``).
        seed: seeds the random test matrices together with (parameter index, refresh
            count), so every rank and every resumed run draws the same numbers.
        nonfinite: ``"skip"`` drops a step whose gradients hold inf/NaN (counted in
            ``skipped_steps``) before anything reaches an SVD; ``"raise"`` stops.
        per_layer: update each parameter inside backward (``register_per_layer_hooks``)
            so full gradients never all exist at once.
        comm: the parallelism's collectives (``lotus_dist.comm``), fixed for the
            optimizer's life; ``LocalComm()`` (one process) when omitted.
        foreach: run the elementwise Adam work of a group's tensors as one foreach
            kernel per operation (same arithmetic as the per-tensor loop, fewer launches).
        **defaults: overrides of ``DEFAULTS`` for every group.
    """

    #: Whether ``prepare`` checks the gradients for inf/NaN (one host sync); a subclass
    #: whose wrapper steps only after its own global check (DeepSpeed) turns it off.
    checks_finite = True

    def __init__(self, params: Iterable, *, seed: int = 0, nonfinite: str = "skip",
                 per_layer: bool = False, comm: LocalComm | None = None,
                 foreach: bool = True, **defaults: Any) -> None:
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"LotusAdamW: unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(DEFAULTS)}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"LotusAdamW: nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.seed = seed
        self.nonfinite = nonfinite
        self.per_layer = per_layer
        self.foreach = foreach
        self.skipped_steps = 0
        self._comm = comm if comm is not None else LocalComm()
        self._lowrank: dict[torch.Tensor, torch.Tensor] = {}  # R per matrix, from prepare()
        self._fresh: dict[torch.Tensor, torch.Tensor] = {}  # bases refreshed, for the check
        #: Per-layer mode: (parameter, device-side finite flag) that step() still reads.
        self._unsettled: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: Projected backward (``project_in_backward``): the linear of each projected weight.
        self._sites: dict[torch.Tensor, ProjectionSite] = {}
        self._prepared = False
        #: In per-layer mode, False on micro-batches that only accumulate gradients.
        self.accumulation_boundary = True
        self._index: dict[torch.Tensor, int] = {}  # global parameter index, seeds the refreshes
        self._group_of: dict[torch.Tensor, dict] = {}
        super().__init__(params, {**DEFAULTS, **defaults})

    # ----------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = set(param_group) - _GROUP_KEYS
        if unknown:
            raise ValueError(f"LotusAdamW param group: unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(_GROUP_KEYS - {'initial_lr'})}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            _validate_projected_group(group)
        for p in group["params"]:
            self._index[p] = len(self._index)
            self._group_of[p] = group

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def comm(self) -> LocalComm:
        """The parallelism's collectives, fixed at construction (no setter: a comm
        swapped later would leave state built for another layout)."""
        return self._comm

    def alias(self, view: torch.Tensor, original: torch.Tensor, group: dict[str, Any]) -> None:
        """Let ``view`` (a reshaped or master copy of ``original`` that a wrapper such as
        DeepSpeed steps) stand for ``original``: same index, so the same refresh seeds,
        and options from ``group``."""
        self._index[view] = self._index[original]
        self._group_of[view] = group

    def _side(self, p: torch.Tensor) -> str:
        """The side ``p``'s group projects it on."""
        return projection_side(p.shape, self._group_of[p]["proj_type"])

    def _refresh_due(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s next ``prepare()`` refreshes its basis first (none yet, or a
        switch decided on): such a step needs its whole gradient."""
        state = self.state.get(p, {})
        return "basis" not in state or state["refresh_pending"]

    def _full_basis(self, p: torch.Tensor) -> torch.Tensor:
        return self.comm.full_basis(p, self.state[p]["basis"], self._side(p))

    def projected_params(self) -> list[torch.Tensor]:
        """The parameters of projected groups (those with ``rank``), in group order."""
        return [p for g in self.param_groups if "rank" in g for p in g["params"]]

    def current_basis(self, p: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """(basis, side) that will project ``p``'s gradient at the next ``prepare()``, or
        None where that step refreshes first (no basis yet, or a switch is pending): the
        R of such a matrix can only be formed after the refresh."""
        if self._refresh_due(p):
            return None
        return self._full_basis(p), self._side(p)

    def project_in_backward(self, model: nn.Module) -> None:
        """Make the backward of every projected weight's linear yield R in the current
        basis instead of the full gradient (``lotus_dist.projected_linear``): outside
        refresh steps ``p.grad`` stays None and ``prepare()`` takes R from the linear.
        A step that refreshes ``p`` (decided the step before) forms its whole gradient.
        Energy telemetry (||R|| / ||G||) is then only known on refresh steps."""
        if self.per_layer:
            raise ValueError("project_in_backward: per-layer mode steps on full gradients")
        self._sites = install_projected_backward(model, self.projected_params(),
                                                 self._backward_projection)
        for p, site in self._sites.items():
            site.reduce = self.comm.backward_reduce(p, self._side(p))

    def _backward_projection(self, p: torch.Tensor) -> Projection:
        """What the projected backward of ``p`` uses this step (``current_basis``'s
        rule): None where the step refreshes; else the whole basis on demand, so that
        under FSDP a row-sharded basis is gathered where it is used and then freed."""
        if self._refresh_due(p):
            return None
        return (lambda: self._full_basis(p)), self._side(p), self._group_of[p]["rank"]

    def projection_sites(self) -> dict[torch.Tensor, ProjectionSite]:
        """The projected linear of each weight (``project_in_backward``), by weight."""
        return dict(self._sites)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drop R the projected backward summed for a step that was not taken."""
        super().zero_grad(set_to_none)
        for site in self._sites.values():
            site.take()

    # ----------------------------------------------------------------- stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step: ``prepare()`` (unless the caller already did), then update.

        In per-layer mode the hooks already updated every parameter and freed its
        gradient, so this only updates parameters whose gradient no hook consumed (for
        example the zero-gradient step that initialises state before a checkpoint load).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.settle_nonfinite()
        if not self._prepared and not self.prepare():
            return loss
        self._prepared = False
        with no_autocast():  # the closure's forward keeps the caller's autocast
            self._update([(g, p) for g in self.param_groups for p in g["params"]
                          if p.grad is not None or p in self._lowrank])
        return loss

    @torch.no_grad()
    @without_autocast
    def prepare(self) -> bool:
        """First half of a step: check the gradients, refresh the bases that are due and
        project, so that the low-rank gradients the update will consume are known.

        Returns False, counting or raising as ``nonfinite`` says, when a gradient holds
        inf/NaN: nothing was refreshed and the caller must not call ``step()``. Engines
        call it before clipping on ``consumed_grad_norm()``; ``step()`` calls it itself.
        """
        # R the projected backward formed (no refresh was due for those matrices)
        summed = [(p, r, self._side(p))
                  for p, site in self._sites.items() if (r := site.take()) is not None]
        delivered = dict(zip([p for p, _, _ in summed], self.comm.backward_lowrank(summed)))
        items = [(g, p) for g in self.param_groups for p in g["params"]
                 if p.grad is not None or p in delivered]
        if not items:
            return False
        checked = [local_view(delivered[p]) if p in delivered else local_view(p.grad)
                   for _, p in items]
        if self.checks_finite and not self.comm.agree(_all_finite(checked)):
            self._on_nonfinite("step")
            return False
        projected = [(group, p) for group, p in items if "rank" in group]
        self._refresh_if_due(projected)
        # every matrix's R in one call, so that the comm can reduce them in one bucket
        wanted = [(p, self.state[p]["basis"], projection_side(p.shape, group["proj_type"]))
                  for group, p in projected if p not in delivered]
        self._lowrank.update(zip([p for p, _, _ in wanted], self.comm.lowrank_grads(wanted)))
        self._lowrank.update(delivered)
        if self.comm.check_consistency:
            # a basis refreshed this step as each rank computed it: a sharded store
            # would assemble rows from different ranks into one agreeing basis
            fresh, self._fresh = self._fresh, {}
            self.comm.check_bases([(name, fresh[p] if p in fresh else self._full_basis(p),
                                    self.state[p]["refresh_count"])
                                   for name, p in self._projected_with_basis()])
        self._prepared = True
        return True

    @torch.no_grad()
    def consumed_grad_norm(self) -> float:
        """Norm of what the update consumes: the low-rank gradients R of projected matrices
        and the full gradients of the rest. Call after ``prepare()``; this is the norm that
        low-rank communication can clip on, offered here so runs can be compared."""
        parts = [partial_dot(r, r) for r in self._lowrank.values()]
        parts += [partial_dot(p.grad, p.grad) for g in self.param_groups if "rank" not in g
                  for p in g["params"] if p.grad is not None]
        return float(self.comm.norm_sq_reduce(torch.stack(parts).sum()).sqrt())

    @torch.no_grad()
    def scale_consumed_grads(self, factor: float) -> None:
        """Multiply what the update consumes by ``factor`` (clipping).

        R is linear in G, so scaling both R and the gradient of a projected matrix is the
        same as having projected ``factor * G``: the recovery residual G - back(R), the
        captured energy and path efficiency's unit gradients all see the clipped G.
        """
        for r in self._lowrank.values():
            r.mul_(factor)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    local_view(p.grad).mul_(factor)

    def _on_nonfinite(self, where: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradient in {where} (inf or NaN) and optim.nonfinite=raise; set "
                "optim.nonfinite=skip to skip such steps, or lower the learning rate")
        self.skipped_steps += 1

    def _update(self, items: list[tuple[dict, torch.Tensor]],
                ok: torch.Tensor | None = None) -> torch.Tensor | None:
        """Update parameters; switch statistics of all matrices share one reduce, and the
        elementwise Adam work of all parameters of a group runs as one foreach kernel per
        operation (``foreach``), so 224 matrices do not mean 224 launches per op. Each
        projected matrix's update goes straight into the parameter.

        ``ok`` (per-layer mode) is the device-side finite flag of the one parameter in
        ``items``, whose gradient was zeroed where it is false: the update is then a
        no-op. Where the step needs host numbers anyway (a switch check, the recovery
        limiter) the flag is read there and a non-finite parameter is skipped at once.
        Returns the flag still to be settled (``settle_nonfinite``), else None.
        """
        lowrank, plain = [], []
        for group, p in items:
            if "rank" in group:
                lowrank.append((group, p, self._lowrank.pop(p)))
            else:
                plain.append((group, p))
        if plain:
            for _, p in plain:
                _init_moments(self.state[p], p)
            directions = self._adam_directions([(g, self.state[p], p.grad) for g, p in plain],
                                               ok)
            self._apply_updates([(g, p, d) for (g, p), d in zip(plain, directions)], ok)
        if not lowrank:
            return ok
        grads = [self._consumed_grad(g, p) for g, p, _ in lowrank]
        stats = [SWITCH_POLICIES[g["switch"]].stats(g, self.state[p], r, grad)
                 for (g, p, r), grad in zip(lowrank, grads)]
        if ok is not None and (any(s is not None for s in stats)
                               or any(g["recovery_scaling"] for g, _, _ in lowrank)):
            if not bool(ok):  # the host reads this step's numbers anyway: settle now
                for _, p, _ in lowrank:
                    self.state[p]["steps_since_refresh"] -= 1
                self._on_nonfinite(f"parameter #{self._index[lowrank[0][1]]}")
                return None
            ok = None
        reduced = self._reduce_stats(stats)
        for (group, p, r), grad, s in zip(lowrank, grads, reduced):
            SWITCH_POLICIES[group["switch"]].decide(group, self.state[p], r, grad, s)
            _init_moments(self.state[p], r)
        self._apply_lowrank(lowrank, self._adam_directions(
            [(g, self.state[p], r) for g, p, r in lowrank], ok), ok)
        return ok

    def _consumed_grad(self, group: dict, p: torch.Tensor) -> ConsumedGrad:
        """What a switch policy may read of ``p``'s gradient: nothing under low-rank DDP,
        nor where the projected backward delivered only R."""
        if not self.comm.exposes_full_grad or p.grad is None:
            return ConsumedGrad(None)
        side = projection_side(p.shape, group["proj_type"])
        return ConsumedGrad(p.grad, lambda basis: self.comm.lowrank_grad(p, basis, side))

    def _reduce_stats(self, stats: list[torch.Tensor | None]) -> list[list[float] | None]:
        """Sum every matrix's partial sums in one reduce and copy them to the host once:
        one sync per step for all switch decisions, not one per matrix."""
        present = [s for s in stats if s is not None]
        if not present:
            return [None] * len(stats)
        flat = self.comm.stats_reduce(torch.cat([upcast(s) for s in present]))
        values = flat.double().tolist()
        out: list[list[float] | None] = []
        start = 0
        for s in stats:
            if s is None:
                out.append(None)
            else:
                out.append(values[start:start + s.numel()])
                start += s.numel()
        return out

    # ----------------------------------------------------------------- the Lotus step

    def _refresh_if_due(self, items: list[tuple[dict, torch.Tensor]]) -> None:
        """Refresh, in one burst (``_refresh``), the bases of the (group, p) of ``items``
        where a switch was decided (or there is none yet); count a step for the rest."""
        due = []
        for group, p in items:
            if self._refresh_due(p):
                due.append((group, p))
            else:
                self.state[p]["steps_since_refresh"] += 1
        if due:
            self._refresh(due)

    def _refresh_and_project(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        """Refresh the basis if due, then return R, the low-rank gradient (fp32)."""
        self._refresh_if_due([(group, p)])
        side = projection_side(p.shape, group["proj_type"])
        return self.comm.lowrank_grad(p, self.state[p]["basis"], side)

    def _refresh(self, due: list[tuple[dict, torch.Tensor]]) -> None:
        """New bases for the (group, p) of ``due``, computed together rather than one
        matrix at a time (step 1 refreshes every matrix, and adaptive refreshes tend to
        come together):

        * exact SVDs (``svd``, Grassmann's first basis) are shared out over the ranks,
          each computing its share and broadcasting it (``comm.svd_bases``);
        * rSVDs of matrices alike in local shape, side, layout, rank, oversampling and
          power iterations run as one batched rSVD (``rsvd_bases``), one collective per
          sketch stage for the whole batch, at most ``rsvd_batch_size`` at once. Each
          matrix draws its test matrix from its own ``refresh_generator``, so its numbers
          do not depend on which others refresh with it;
        * random and Grassmann bases one at a time.

        Each batch is installed (``_install_basis``) before the next is computed, so the
        whole new bases of one batch at most exist at once. Every rank forms the same
        batches in the same order: ``due`` and the options are the same everywhere.
        """
        svd, rsvd, single = [], {}, []
        for group, p in due:
            side = projection_side(p.shape, group["proj_type"])
            kind = group["projection"]
            if kind == "svd" or (kind == "grassmann" and not self.state[p].get("refresh_count")):
                svd.append((group, p, side))
            elif kind == "rsvd":
                comm, grad = self.comm.rsvd_comm(p, side), local_view(p.grad)
                key = (grad.shape, grad.dtype, grad.device, side, group["rank"],
                       group["oversample"], group["power_iters"], comm.layout)
                rsvd.setdefault(key, (comm, []))[1].append((group, p, side))
            else:
                single.append((group, p, side))
        if svd:
            # at least one matrix per rank, so that every rank has its share of each batch
            itemsize = max(compute_dtype(local_view(p.grad)).itemsize for _, p, _ in svd)
            whole = max(projected_dim(p.shape, side) * g["rank"] for g, p, side in svd)
            size = max(self.comm.world, REFRESH_BATCH_BYTES // (whole * itemsize))
            for start in range(0, len(svd), size):
                batch = svd[start:start + size]
                bases = self.comm.svd_bases([(p, g["rank"], side) for g, p, side in batch])
                for (group, p, side), basis in zip(batch, bases):
                    self._install_basis(group, p, side, basis, replicated=True)
        for comm, members in rsvd.values():  # the first matrix's comm serves its key
            group, p, side = members[0]
            rank = group["rank"]
            options = {"oversample": group["oversample"], "power_iters": group["power_iters"],
                       "comm": comm}
            size = rsvd_batch_size(local_view(p.grad), rank, side, group["oversample"], comm)
            for start in range(0, len(members), size):
                batch = members[start:start + size]
                grads = [local_view(p.grad) for _, p, _ in batch]
                gens = [self._generator(p) for _, p, _ in batch]
                # one matrix through the per-matrix entry point (the one tools wrap)
                bases = (rsvd_bases(grads, rank, side, generators=gens, **options)
                         if len(batch) > 1 else
                         [rsvd_basis(grads[0], rank, side, generator=gens[0], **options)])
                for (group, p, side), basis in zip(batch, bases):
                    self._install_basis(group, p, side, basis)
        for group, p, side in single:
            if group["projection"] == "random":
                grad = local_view(p.grad)
                basis = random_basis(projected_dim(p.shape, side), group["rank"],
                                     self._generator(p), grad.device, compute_dtype(grad))
                self._install_basis(group, p, side, basis)
            else:
                old = self.comm.full_basis(p, self.state[p]["basis"], side)
                basis = grassmann_step(old, group["walk_step"], self._generator(p))
                self._install_basis(group, p, side, basis, old=old)

    def _generator(self, p: torch.Tensor) -> torch.Generator:
        """The random stream of ``p``'s next refresh (its test matrix or random basis)."""
        return refresh_generator(self.seed, self._index[p], self.state[p].get("refresh_count", 0))

    def _install_basis(self, group: dict, p: torch.Tensor, side: str, basis: torch.Tensor, *,
                       old: torch.Tensor | None = None, replicated: bool = False) -> None:
        """Make the whole ``basis`` ``p``'s: signs aligned with the old basis (``old``,
        gathered here when not given), moments carried, the refresh recorded and the
        switch policy restarted, then stored as the comm keeps it (``replicated``: the
        basis is bitwise the same on every rank already)."""
        state = self.state[p]
        count = state.get("refresh_count", 0)
        if old is None and "basis" in state:
            old = self.comm.full_basis(p, state["basis"], side)
        if old is not None:
            if group["projection"] != "svd":  # exact SVD keeps GaLore's own signs
                basis = align_signs(basis, old)
            self._carry_moments(group, state, old, basis, side)
            _record_interval(state, state["steps_since_refresh"])
        else:
            state.update(refresh_intervals=0, interval_sum=0, interval_min=0, interval_max=0)
        state["basis"] = basis
        state["refresh_count"] = count + 1
        state["steps_since_refresh"] = 1
        state["refresh_pending"] = False
        state.setdefault("energy", math.nan)
        state.setdefault("switch_metric", math.nan)
        SWITCH_POLICIES[group["switch"]].on_refresh(
            group, state, refresh_generator(self.seed, self._index[p], count, stream=1))
        if self.comm.check_consistency:
            self._fresh[p] = basis.clone()  # as computed: store_basis may overwrite it
        state["basis"] = self.comm.store_basis(p, basis, side, replicated)  # whole until here

    def _carry_moments(self, group: dict, state: dict, old: torch.Tensor, new: torch.Tensor,
                       side: str) -> None:
        """Adam moments across a refresh: keep (GaLore), reset, or rotate (GrassWalk AO,
        in LDAdam's bias-corrected form; see ``rotate_moments``)."""
        if "exp_avg" not in state or group["moments"] == "keep" or state["step"] == 0:
            return
        m, v = local_view(state["exp_avg"]), local_view(state["exp_avg_sq"])
        if group["moments"] == "reset":
            m.zero_()
            v.zero_()
            state["step"] = 0  # restart bias correction with the moments
            return
        bias1, bias2 = _bias_corrections(group, state["step"])
        m_new, v_new = rotate_moments(m, v, old, new, side, bias1=bias1, bias2=bias2)
        m.copy_(m_new)
        v.copy_(v_new)

    def _apply_lowrank(self, lowrank: list[tuple[dict, torch.Tensor, torch.Tensor]],
                       directions: list[torch.Tensor], ok: torch.Tensor | None = None) -> None:
        """Update each projected ``p`` (its local part) from Adam's low-rank direction N:
        ``p += -step * scale * back(N)`` is one ``addmm_`` into the parameter, so no
        full-size update is formed. With recovery scaling the update is formed, one
        matrix at a time; the recovery terms' norms share one reduce and one host copy: a
        first pass computes each term's squared norm and drops the term, the second
        recomputes it (cheaper than holding every matrix's full-size term until the
        reduce). ``ok`` masks the weight decay (per-layer mode, ``_per_layer_hook``)."""
        recovery = [i for i, (group, _, _) in enumerate(lowrank) if group["recovery_scaling"]]
        norms: dict[int, float] = {}
        if recovery:
            sq = torch.stack([partial_dot(t, t) for t in
                              (self._recovery(*lowrank[i], directions[i]) for i in recovery)])
            norms = dict(zip(recovery, self.comm.norm_sq_reduce(sq).sqrt().tolist()))
        for i, ((group, p, r), norm_r) in enumerate(zip(lowrank, directions)):
            state = self.state[p]
            side = projection_side(p.shape, group["proj_type"])
            step_size = _step_size(group, state["step"])
            local = local_view(p)  # a sharded parameter updates its local shard, in place
            if i in norms:
                update = self.comm.project_back(p, norm_r, state["basis"], side)
                update.mul_(group["scale"])
                # Fira adds the residual term without GaLore's scale (docs/algorithm.md)
                update += _limit_recovery(group, state, self._recovery(group, p, r, norm_r),
                                          norms[i])
                local.add_(update.to(local.dtype), alpha=-step_size)
            else:
                add_projected_back(local, local_view(norm_r),
                                   self.comm.back_basis(p, state["basis"], side), side,
                                   alpha=-step_size * group["scale"])
            _decay(group, local, ok)

    def _recovery(self, group: dict, p: torch.Tensor, r: torch.Tensor,
                  norm_r: torch.Tensor) -> torch.Tensor:
        """The recovery term of ``p`` before its limiter (``_recovery_term``)."""
        side = projection_side(p.shape, group["proj_type"])
        residual = upcast(local_view(p.grad)) - self.comm.project_back(p, r, self.state[p]["basis"],
                                                                        side)
        return _recovery_term(residual, local_view(r), local_view(norm_r), side)

    def _adam_directions(self, items: list[tuple[dict, dict, torch.Tensor]],
                         ok: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Update the moments of each (group, state, grad) and return m / (sqrt(v) + eps)
        (GaLore's form), on local shards. ``foreach`` runs each operation once per group
        over all its tensors; the arithmetic of every tensor is the same either way.
        ``ok``: a device-side finite flag (per-layer mode, see ``_adam_direction``)."""
        for _, state, _ in items:
            state["step"] += 1
        if not self.foreach or ok is not None:
            return [_adam_direction(g, state, grad, ok) for g, state, grad in items]
        out: dict[int, torch.Tensor] = {}
        for group, members in _by_group(items):
            beta1, beta2 = group["betas"]
            m = [local_view(state["exp_avg"]) for _, state, _ in members]
            v = [local_view(state["exp_avg_sq"]) for _, state, _ in members]
            g = [local_view(grad) for _, _, grad in members]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, g, alpha=1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            for (i, _, _), d in zip(members, torch._foreach_div(m, denom)):
                out[i] = d
        return [out[i] for i in range(len(items))]

    def _apply_updates(self, items: list[tuple[dict, torch.Tensor, torch.Tensor]],
                       ok: torch.Tensor | None = None) -> None:
        """p -= step_size * direction, then decoupled weight decay, as GaLore's AdamW;
        with ``foreach``, one kernel per (step size, dtype) and per decay factor."""
        if not self.foreach or ok is not None:
            for group, p, direction in items:
                _apply_update(group, p, self.state[p], direction, ok)
            return
        steps: dict[tuple[float, torch.dtype], tuple[list, list]] = {}
        decays: dict[float, list[torch.Tensor]] = {}
        for group, p, direction in items:
            local = local_view(p)  # a sharded parameter updates its local shard, in place
            key = (_step_size(group, self.state[p]["step"]), local.dtype)
            params, dirs = steps.setdefault(key, ([], []))
            params.append(local)
            direction = local_view(direction)
            dirs.append(direction if direction.dtype == local.dtype else direction.to(local.dtype))
            if group["weight_decay"] > 0.0:
                decays.setdefault(group["lr"] * group["weight_decay"], []).append(local)
        for (step_size, _), (params, dirs) in steps.items():
            torch._foreach_add_(params, dirs, alpha=-step_size)
        for factor, params in decays.items():
            torch._foreach_add_(params, params, alpha=-factor)

    # ----------------------------------------------------------------- per-layer mode

    def register_per_layer_hooks(self) -> list:
        """Update each parameter as soon as its gradient is accumulated (GaLore's
        layer-wise mode), then free the gradient.

        The update happens only when ``accumulation_boundary`` is True, so under gradient
        accumulation each parameter steps once per optimizer step, on the summed
        gradient, with the learning rate the schedule set for that step. Gradient
        clipping needs all gradients at once and is not available in this mode.
        A non-finite gradient skips that parameter's update (counted) or raises.
        """
        if not self.per_layer:
            raise RuntimeError("register_per_layer_hooks needs LotusAdamW(per_layer=True)")
        return [p.register_post_accumulate_grad_hook(self._per_layer_hook)
                for p in self._all_params() if p.requires_grad]

    @torch.no_grad()
    @without_autocast
    def _per_layer_hook(self, p: torch.Tensor) -> None:
        """Update ``p`` from its summed gradient without a host sync on most steps.

        The finite check is a device-side flag: a non-finite gradient is zeroed and the
        update made a no-op through the flag (``_update``), and ``step()`` reads every
        flag of the step in one copy (``settle_nonfinite``) to take back the skipped
        parameters' step counts. Only a refresh (an rSVD must not see inf/NaN) reads the
        flag first: one sync per refreshed matrix, on refresh steps only.
        """
        if not self.accumulation_boundary:
            return
        group = self._group_of[p]
        if "rank" in group and self._refresh_due(p):
            if not _all_finite([p.grad]):
                self._on_nonfinite(f"parameter #{self._index[p]}")
            else:
                self._lowrank[p] = self._refresh_and_project(group, p)
                self._update([(group, p)])
        else:
            ok = _finite_flag(p.grad)
            p.grad.masked_fill_(~ok, 0.0)
            if "rank" in group:
                self._lowrank[p] = self._refresh_and_project(group, p)
            pending = self._update([(group, p)], ok)
            if pending is not None:
                self._unsettled.append((p, pending))
        p.grad = None

    def settle_nonfinite(self) -> None:
        """Per-layer mode: read the hooks' finite flags of this step in one host copy; a
        parameter whose gradient was non-finite was not moved and its moments were kept:
        take back its step counts and count (or raise) the skip. Engines call it after
        backward (so the step's skips are counted with it); ``step()`` calls it too."""
        if not self._unsettled:
            return
        pending, self._unsettled = self._unsettled, []
        for (p, _), fine in zip(pending, torch.stack([ok for _, ok in pending]).tolist()):
            if not fine:
                state = self.state[p]
                state["step"] -= 1
                if "rank" in self._group_of[p]:
                    state["steps_since_refresh"] -= 1
                self._on_nonfinite(f"parameter #{self._index[p]}")

    # ----------------------------------------------------------------- state and telemetry

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["lotus"] = {"skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lotus", {})
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; the low-rank state is fp32
        # by design, so put the saved tensors back in their own dtype. Saved keys map to
        # parameters through the groups' "params" lists, as in torch (indices or names).
        saved_keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        params = dict(zip(saved_keys, self._all_params(), strict=True))
        for key, saved in state_dict["state"].items():
            p = params[key]
            if "basis" in saved:
                for name, value in saved.items():
                    if torch.is_tensor(value) and name != "step":
                        self.state[p][name] = value.detach().to(device=p.device, copy=True)
        self.skipped_steps = int(extra.get("skipped_steps", 0))

    def telemetry(self) -> dict[str, dict[str, float]]:
        """Per projected matrix, keyed by parameter name: refresh count, steps since
        refresh, last switch metric (displacement or rho), captured energy ||R||/||G||, and
        the spread of the intervals between its refreshes (min, mean, max steps; NaN
        before the second refresh). All plain numbers."""
        out = {}
        for name, p in self._projected_with_basis():
            state = self.state[p]
            n = state.get("refresh_intervals", 0)
            out[name] = {
                "refresh_count": state["refresh_count"],
                "steps_since_refresh": state["steps_since_refresh"],
                "switch_metric": state["switch_metric"],
                "energy": state["energy"],
                "refresh_interval_min": float(state["interval_min"]) if n else math.nan,
                "refresh_interval_mean": state["interval_sum"] / n if n else math.nan,
                "refresh_interval_max": float(state["interval_max"]) if n else math.nan,
            }
        return out

    def _projected_with_basis(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of every projected matrix that has a basis, in group order."""
        out = []
        for group in self.param_groups:
            if "rank" not in group:
                continue
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                if "basis" in self.state.get(p, {}):
                    out.append((name or f"param{self._index[p]}", p))
        return out


# --------------------------------------------------------------------- helpers


def _validate_projected_group(group: dict) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"LotusAdamW projected group: {msg}")

    rank = group["rank"]
    if not isinstance(rank, int) or rank < 1:
        raise bad(f"rank must be a positive int, got {rank!r}")
    for key, allowed in (("proj_type", PROJ_TYPES), ("projection", PROJECTIONS),
                         ("switch", tuple(SWITCH_POLICIES)), ("moments", MOMENTS)):
        if group[key] not in allowed:
            raise bad(f"{key} must be one of {allowed}, got {group[key]!r}")
    for key, low in (("verify_gap", 1), ("update_proj_gap", 1), ("min_gap", 0),
                     ("power_iters", 0), ("oversample", 0)):
        if not isinstance(group[key], int) or group[key] < low:
            raise bad(f"{key} must be an int >= {low}, got {group[key]!r}")
    if group["gamma"] is None:
        group["gamma"] = _DEFAULT_GAMMA[group["switch"]]
    if not group["gamma"] > 0:
        raise bad(f"gamma must be > 0, got {group['gamma']!r}")
    names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        if p.dim() != 2:
            raise bad(f"parameter {name} has shape {tuple(p.shape)}; only 2-D weights can be "
                      "projected (put it in a group without 'rank')")
        side = projection_side(p.shape, group["proj_type"])
        dim = projected_dim(p.shape, side)
        if rank > dim:
            raise bad(f"rank {rank} exceeds the projected dimension {dim} of parameter {name} "
                      f"with shape {tuple(p.shape)} (rank must be <= min(m, n) for 'std')")


def rotate_moments(m: torch.Tensor, v: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                   side: str, *, bias1: float = 1.0,
                   bias2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Express Adam moments of basis ``old`` in basis ``new`` (GrassWalk's adaptive
    optimizer, in LDAdam's bias-corrected form).

    ``bias1 = 1 - beta1^t`` and ``bias2 = 1 - beta2^t`` (1 without bias correction). The
    estimates m_hat = m / bias1 and v_hat = v / bias2 are what Adam reads; with
    C = B_new^T B_old the gradient's coordinates map as g' = C g, so

        m_hat' = C m_hat
        v_hat' = (C * C) (v_hat - m_hat^2)^+ + m_hat'^2

    (the variance of the rotated estimate, coordinates taken as independent, plus its
    squared mean: v' >= m'^2 >= 0, and a permutation of the basis permutes the moments).
    They are re-biased, m' = bias1 m_hat' and v' = bias2 v_hat', so the next
    bias-corrected read returns the rotated estimates. Rotating the raw moments instead
    mixes a mean and a variance of different bias: at t = 1, (v - m^2)^+ is 0 for
    beta1 = 0.9 however large the variance.
    """
    c = new.T @ old
    m_hat, v_hat = m / bias1, v / bias2
    var = (v_hat - m_hat * m_hat).clamp_min(0)
    if side == "left":  # coordinates index the rows of R (r, n)
        m_new = c @ m_hat
        v_new = (c * c) @ var + m_new * m_new
    else:  # coordinates index the columns of R (m, r)
        m_new = m_hat @ c.T
        v_new = var @ (c * c).T + m_new * m_new
    return m_new * bias1, v_new * bias2


def _bias_corrections(group: dict, step: int) -> tuple[float, float]:
    """(1 - beta1^t, 1 - beta2^t), or (1, 1) where the group does not correct bias."""
    if not group["correct_bias"]:
        return 1.0, 1.0
    beta1, beta2 = group["betas"]
    return 1.0 - beta1 ** step, 1.0 - beta2 ** step


def _record_interval(state: dict, interval: int) -> None:
    """Add the lifetime of the basis being replaced to the refresh-interval statistics."""
    n = state.get("refresh_intervals", 0)
    state["interval_min"] = interval if n == 0 else min(state["interval_min"], interval)
    state["interval_max"] = max(state.get("interval_max", 0), interval)
    state["interval_sum"] = state.get("interval_sum", 0) + interval
    state["refresh_intervals"] = n + 1


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync for the whole list: the norm of a tensor is finite iff it is."""
    norms = torch._foreach_norm(tensors)
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())


def _init_moments(state: dict, like: torch.Tensor) -> None:
    """Zero Adam moments shaped like ``like`` (R for a projected matrix), once."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(like)
        state["exp_avg_sq"] = torch.zeros_like(like)


def _by_group(items: list[tuple[dict, dict, torch.Tensor]]
              ) -> list[tuple[dict, list[tuple[int, dict, torch.Tensor]]]]:
    """(group, [(position, state, tensor)]) for the items of each param group, in order."""
    groups: dict[int, tuple[dict, list]] = {}
    for i, (group, state, t) in enumerate(items):
        groups.setdefault(id(group), (group, []))[1].append((i, state, t))
    return list(groups.values())


def _adam_direction(group: dict, state: dict, grad: torch.Tensor,
                    ok: torch.Tensor | None = None) -> torch.Tensor:
    """Update the moments with ``grad`` and return m / (sqrt(v) + eps) (GaLore's form);
    ``state["step"]`` has already been advanced.

    With a device-side flag ``ok`` (per-layer mode), ``grad`` is zero where ``ok`` is
    false; the moments then keep their values and the direction is zero, so the
    parameter is not moved, and where ``ok`` is true the arithmetic is the unmasked one.
    """
    beta1, beta2 = group["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1 if ok is None else _masked_beta(beta1, ok, m)).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2 if ok is None else _masked_beta(beta2, ok, v))
    v.addcmul_(grad, grad, value=1.0 - beta2)
    direction = m / v.sqrt().add_(group["eps"])
    return direction if ok is None else direction.mul_(ok)


def _step_size(group: dict, step: int) -> float:
    """Adam's bias-corrected learning rate at ``step``."""
    bias1, bias2 = _bias_corrections(group, step)
    return group["lr"] * math.sqrt(bias2) / bias1


def _apply_update(group: dict, p: torch.Tensor, state: dict, direction: torch.Tensor,
                  ok: torch.Tensor | None = None) -> None:
    """p -= step_size * direction, then decoupled weight decay, as GaLore's AdamW."""
    p = local_view(p)  # a sharded parameter updates its local shard, in place
    p.add_(local_view(direction).to(p.dtype), alpha=-_step_size(group, state["step"]))
    _decay(group, p, ok)


def _decay(group: dict, p: torch.Tensor, ok: torch.Tensor | None = None) -> None:
    """Decoupled weight decay p -= lr * wd * p, after the Adam step (GaLore's order).

    A device-side flag ``ok`` (per-layer mode) multiplies the decayed copy: p * 1 is p
    exactly, so the kernel and its rounding are those of the unmasked decay.
    """
    if group["weight_decay"] > 0.0:
        factor = group["lr"] * group["weight_decay"]
        p.add_(p if ok is None else p * ok.to(p.dtype), alpha=-factor)


def _finite_flag(t: torch.Tensor) -> torch.Tensor:
    """True on the device iff ``t`` holds no inf/NaN (its norm is finite); no host sync."""
    return torch._foreach_norm([t])[0].isfinite()


def _masked_beta(beta: float, ok: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``beta`` where ``ok``, else 1 (a moment then keeps its value), as a 0-dim tensor
    of ``like``'s dtype: the same multiplier as the scalar ``beta``, without a copy from
    the host (``torch.full`` fills on the device)."""
    return torch.where(ok, torch.full((), beta, dtype=like.dtype, device=like.device), 1.0)


def _recovery_term(residual: torch.Tensor, r: torch.Tensor, norm_r: torch.Tensor,
                   side: str) -> torch.Tensor:
    """Residual G - B R scaled per column by the optimizer's gain (GrassWalk / Fira),
    in place.

    phi_j = ||N_j|| / ||R_j|| over the columns the projection keeps (left: columns of R;
    right: rows), so the discarded signal moves like Adam moved the kept one. Under
    sharding ``residual`` is this rank's part of G - B R and ``r``, ``norm_r`` the local
    parts of R and N: every kept column is whole on one rank.
    """
    dim = 0 if side == "left" else 1
    phi = norm_r.norm(dim=dim, keepdim=True) / r.norm(dim=dim, keepdim=True).clamp_min(1e-12)
    return residual.mul_(phi)


def _limit_recovery(group: dict, state: dict, term: torch.Tensor, norm: float) -> torch.Tensor:
    """Cap the term's (global) norm at ``recovery_limiter`` times its last value."""
    last = state.get("recovery_norm")
    limit = group["recovery_limiter"]
    if last is not None and last > 0 and norm > limit * last:
        term.mul_(limit * last / norm)
        norm = limit * last
    state["recovery_norm"] = norm
    return term
