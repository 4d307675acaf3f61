"""LotusAdamW as DeepSpeed's client optimizer: map what DeepSpeed hands it back to matrices.

DeepSpeed replaces the tensors in its client optimizer's param groups before the first
step. At stage 0 with fp32 it keeps the model's parameters; at stage 0 with bf16 it puts
fp32 master copies of the same shapes; at ZeRO-1/2 (and in its ``BF16_Optimizer``, which
ZeRO-1 with bf16 and fp32 gradient accumulation selects) it flattens each param group into
one buffer, rounds its length up to a multiple of 2 x world size, cuts it into world-size
equal contiguous partitions and leaves each rank one flat 1-D fp32 partition per group. A
low-rank projection needs matrices.

Whole-matrix ownership (ZeRO-1/2). ``regroup_for_zero`` assigns every projected matrix to
one rank, balanced by bytes, and lays each projected group out as world-size consecutive
slots of equal length: slot k holds rank k's matrices and, where they fall short of the
longest slot, a zero padding parameter. DeepSpeed's cuts then fall on slot boundaries, so
every rank's partition is its own whole matrices, whose full, already averaged gradients
DeepSpeed hands that rank. The owner runs the single-process Lotus step on them; no rank
needs another rank's part of a matrix, the rSVD, the exact SVD and every switch statistic
are local, and the result is the single-process algorithm's on the same global batch.
``bind`` checks with DeepSpeed's own fragment bookkeeping (the ``_hp_mapping`` that links
each parameter to its piece of a partition, which DeepSpeed's universal checkpoints read)
that every projected matrix on a rank is whole, and fails at start-up when one is not.
Parameters that are not projected (embeddings, norms, head) form groups whose partitions
are arbitrary flat slices: their AdamW update is elementwise.

ZeRO-3 partitions every parameter across all ranks, so a rank only ever holds a slice of
each matrix; that is FSDP's territory (``parallel.engine=fsdp``) and is refused upstream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lotus_dist.comm import group_device, sum_over_ranks, svd_owners
from lotus_dist.optim import LotusAdamW

#: Group keys that describe members rather than hyperparameters.
_MEMBER_KEYS = ("params", "param_names")
#: Columns of the telemetry table that ``telemetry`` reduces.
_TELEMETRY_FIELDS = ("refresh_count", "steps_since_refresh", "switch_metric", "energy",
                     "refresh_interval_min", "refresh_interval_mean", "refresh_interval_max")


class PartitionLayoutError(ValueError):
    """A DeepSpeed partition that is not a whole matrix; the message says what to change."""


class ZeroLotusAdamW(LotusAdamW):
    """LotusAdamW whose Lotus step runs on whole matrices whatever DeepSpeed hands it.

    Build it like LotusAdamW (the parameter order fixes each matrix's index, which seeds its
    refreshes, so build it from the same groups as a single-process run); at ZeRO-1/2 call
    ``regroup_for_zero(world_size)`` and run ``deepspeed.initialize`` inside
    ``padding_registered(model)``; then ``bind(engine.optimizer)``. From then on
    ``param_groups`` are DeepSpeed's (the learning-rate schedule writes there) and each step
    runs the inherited Lotus step on the matrix views of the groups DeepSpeed asks to step.

    No finite check of its own where DeepSpeed made one: its ZeRO-1/2 optimizer, its
    BF16_Optimizer and its stage-0 bf16 wrapper compute the global gradient norm first
    and only call ``step`` when it is finite, so ``bind`` turns ``checks_finite`` off there
    (it saves a host sync per param group DeepSpeed steps). At stage 0 in fp32 DeepSpeed
    checks nothing: the check stays, and needs no collective, as every rank holds the same
    all-reduced gradients.
    """

    def __init__(self, params: Iterable, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        #: Original parameters and their names per group, in group order.
        self._members: list[list[tuple[str | None, torch.Tensor]]] = [
            _named_members(g) for g in self.param_groups]
        #: Names of the projected matrices in single-process order (the telemetry rows).
        self._projected_names = [name or f"param{self._index[p]}"
                                 for g, members in zip(self.param_groups, self._members)
                                 if "rank" in g for name, p in members]
        #: Zero parameters that pad each rank's slot of a projected group (``regroup_for_zero``).
        self._padding: list[nn.Parameter] = []
        self._ds_groups: list[dict[str, Any]] | None = None
        #: Per group, what the Lotus step sees: (view, offset in DeepSpeed's flat partition),
        #: offset None where the view is the tensor DeepSpeed holds (and whose .grad it sets).
        self._views: list[list[tuple[torch.Tensor, int | None]]] = []
        self._view_names: list[list[str] | None] = []
        self._sharded = False
        self._table_device: torch.device | None = None  # where telemetry() reduces
        #: Whether ``prepare`` checks the gradients for inf/NaN (LotusAdamW's hook).
        self.checks_finite = True

    @classmethod
    def from_lotus(cls, optimizer: LotusAdamW) -> ZeroLotusAdamW:
        """The groups, options and seed of ``optimizer`` (a freshly built LotusAdamW), in
        the same order, so every matrix keeps its index and refresh seed."""
        specs = []
        for group in optimizer.param_groups:
            spec = {k: v for k, v in group.items() if k not in _MEMBER_KEYS}
            names = group.get("param_names")
            spec["params"] = list(zip(names, group["params"])) if names else group["params"]
            specs.append(spec)
        return cls(specs, seed=optimizer.seed, nonfinite=optimizer.nonfinite,
                   comm=optimizer.comm, foreach=optimizer.foreach)

    # ----------------------------------------------------------------- before DeepSpeed

    def regroup_for_zero(self, world_size: int) -> None:
        """Lay out each projected group as ``world_size`` slots of equal length, slot k
        holding the whole matrices rank k will own and zero padding up to the common length.

        The matrices are assigned to ranks balanced by bytes (``balanced_owners``) and keep
        their single-process order within a slot. The length is the fullest slot's, rounded
        up to even: ZeRO-1/2 round a group up to a multiple of 2 x world size before cutting
        it, which then adds nothing and cuts exactly between slots. Non-projected groups stay
        as they are.
        """
        self._padding = []
        for i, group in enumerate(self.param_groups):
            if "rank" not in group:
                continue
            matrices = [p for _, p in self._members[i]]
            owners = balanced_owners([p.numel() for p in matrices], world_size)
            loads = [sum(matrices[j].numel() for j in owned) for owned in owners]
            slot = max(loads) + max(loads) % 2
            laid_out = []
            for owned, load in zip(owners, loads):
                laid_out += [matrices[j] for j in owned]
                if load < slot:
                    self._padding.append(nn.Parameter(matrices[0].new_zeros(slot - load)))
                    laid_out.append(self._padding[-1])
            group["params"] = laid_out
            group.pop("param_names", None)  # the members keep the names; padding has none

    @property
    def padding_numel(self) -> int:
        """Elements of zero padding ``regroup_for_zero`` added (DeepSpeed reduces and
        gathers them with the rest)."""
        return sum(p.numel() for p in self._padding)

    @contextlib.contextmanager
    def padding_registered(self, module: nn.Module) -> Iterator[None]:
        """Build DeepSpeed inside this: the padding is a parameter of ``module`` meanwhile.

        DeepSpeed names every tensor it flattens after ``module.named_parameters()`` (it
        records the names in its checkpoints), so the padding must be there while it is
        built; it leaves afterwards, so the model's forward, state dict and export never
        see it. DeepSpeed keeps the names (as ``lotus_zero_padding.<k>``).
        """
        if not self._padding:
            yield
            return
        module.add_module("lotus_zero_padding", nn.ParameterList(self._padding))
        try:
            yield
        finally:
            del module.lotus_zero_padding

    # ----------------------------------------------------------------- after DeepSpeed

    def bind(self, ds_optimizer: Any) -> None:
        """Map the tensors DeepSpeed put into ``param_groups`` back to matrices.

        ``ds_optimizer`` is ``engine.optimizer`` after ``deepspeed.initialize``: this
        optimizer itself (stage 0, fp32), DeepSpeed's per-parameter fp32-master wrapper
        (stage 0, bf16), its ZeRO-1/2 optimizer, or its BF16_Optimizer (ZeRO-1 with bf16
        and ``data_types.grad_accum_dtype=fp32``). Anything else, or a projected matrix
        that a partition cuts, raises PartitionLayoutError.
        """
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self._ds_groups = list(self.param_groups)
        if len(self._ds_groups) != len(self._members):
            raise PartitionLayoutError("DeepSpeed changed the number of param groups of "
                                       "LotusAdamW; lotus-dist cannot map them back")
        if isinstance(ds_optimizer, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
            if getattr(ds_optimizer, "cpu_offload", False):
                raise PartitionLayoutError("LotusAdamW does not run with ZeRO optimizer "
                                           "offload; remove zero_optimization.offload_optimizer")
            self._sharded = dist.is_initialized() and dist.get_world_size() > 1
            self._table_device = group_device() if self._sharded else None
            mapped = [self._partition_views(i) for i in range(len(self._members))]
        elif ds_optimizer is self or isinstance(ds_optimizer, FP16_UnfusedOptimizer):
            mapped = [self._same_shape_views(i) for i in range(len(self._members))]
        else:
            raise PartitionLayoutError(
                f"DeepSpeed wrapped LotusAdamW in {type(ds_optimizer).__name__}, whose layout "
                "lotus-dist cannot map back to matrices (stage 0, ZeRO-1/2 and DeepSpeed's "
                "BF16_Optimizer are supported)")
        self._views = [views for views, _ in mapped]
        self._view_names = [names for _, names in mapped]
        self.checks_finite = ds_optimizer is self  # the others step only on a finite norm
        for i, views in enumerate(self._views):
            for (view, _), (_, original) in zip(views, self._members[i]):
                self.alias(view, original, self._ds_groups[i])

    def _same_shape_views(self, i: int) -> tuple[list[tuple[torch.Tensor, None]], list[str] | None]:
        """Stage 0: the group holds the parameters or same-shaped fp32 masters, in order."""
        held = self._ds_groups[i]["params"]
        members = self._members[i]
        if [t.shape for t in held] != [p.shape for _, p in members]:
            raise PartitionLayoutError(f"DeepSpeed changed the shapes in param group {i}")
        return [(t, None) for t in held], self._ds_groups[i].get("param_names")

    def _partition_views(self, i: int) -> tuple[list[tuple[torch.Tensor, int | None]],
                                                list[str] | None]:
        """ZeRO-1/2, BF16_Optimizer: views of this rank's whole matrices in its flat fp32
        partition, where DeepSpeed's fragment links (``_hp_mapping``) place them."""
        (flat,) = self._ds_groups[i]["params"]
        if "rank" not in self._ds_groups[i]:
            return [(flat, None)], None  # AdamW is elementwise: any flat slice will do
        owned, views = [], []
        for name, p in self._members[i]:
            if not hasattr(p, "_hp_mapping"):
                raise PartitionLayoutError("DeepSpeed did not link its partitions to the "
                                           "parameters (_hp_mapping); this DeepSpeed version "
                                           "is not supported with LotusAdamW at ZeRO-1/2")
            if p._hp_mapping is None:
                continue  # another rank's matrix
            piece = p._hp_mapping.lp_fragment_address
            start = p._hp_mapping.get_hp_fragment_address().start
            if piece.start != 0 or piece.numel != p.numel() or start + p.numel() > flat.numel():
                raise PartitionLayoutError(
                    f"the ZeRO partition of projected group {i} on this rank holds elements "
                    f"{piece.start}..{piece.start + piece.numel} of the {p.numel()} of "
                    f"{name}: DeepSpeed cut a matrix (zero_optimization.parameter_alignment "
                    "pads some matrices and shifts the layout: remove it, or use "
                    "parallel.engine=fsdp)")
            owned.append((name, p))
            views.append((flat.detach().narrow(0, start, p.numel()).view(p.shape), start))
        self._members[i] = owned
        return views, [name or f"param{self._index[p]}" for name, p in owned]

    # ----------------------------------------------------------------- stepping

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """The Lotus step on the matrix views of the groups DeepSpeed asks to step (ZeRO-1/2
        steps one group at a time, by narrowing ``param_groups`` to it).

        Before ``bind`` this does nothing: DeepSpeed's stage-0 bf16 wrapper steps once on
        zero gradients while it is built, to create optimizer state eagerly. Lotus creates
        its state at the first real step, and a basis drawn from a zero gradient would be
        noise that also shifts the refresh count away from the single-process run's.
        """
        if closure is not None:
            raise ValueError("ZeroLotusAdamW.step takes no closure (DeepSpeed passes none)")
        if self._ds_groups is None:
            return None
        requested = [self._group_position(g) for g in self.param_groups]
        with self._matrix_view(requested):
            return super().step()

    def _group_position(self, group: dict[str, Any]) -> int:
        for i, ds_group in enumerate(self._ds_groups):
            if ds_group is group:
                return i
        raise RuntimeError("DeepSpeed asked ZeroLotusAdamW to step a param group it never saw")

    @contextlib.contextmanager
    def _matrix_view(self, positions: Iterable[int] | None = None) -> Iterator[None]:
        """Let the inherited code see matrix views with DeepSpeed's current hyperparameters
        (the schedule writes the learning rate into DeepSpeed's groups) and gradients."""
        saved = self.param_groups
        positions = range(len(self._ds_groups)) if positions is None else positions
        reshaped = []
        groups = []
        for i in positions:
            ds_group = self._ds_groups[i]
            group = {k: v for k, v in ds_group.items() if k not in _MEMBER_KEYS}
            group["params"] = [view for view, _ in self._views[i]]
            if self._view_names[i] is not None:
                group["param_names"] = self._view_names[i]
            groups.append(group)
            for view, start in self._views[i]:
                if start is not None:
                    grad = ds_group["params"][0].grad
                    view.grad = (None if grad is None else
                                 grad.narrow(0, start, view.numel()).view(view.shape))
                    reshaped.append(view)
        self.param_groups = groups
        try:
            yield
        finally:
            self.param_groups = saved
            for view in reshaped:
                view.grad = None

    # ----------------------------------------------------------------- state and telemetry

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (DeepSpeed saves one file per rank at ZeRO-1/2)."""
        if self._ds_groups is None:
            return super().state_dict()
        with self._matrix_view():
            # DeepSpeed's fragment linking leaves empty entries keyed by flat partitions
            viewed = {id(p) for g in self.param_groups for p in g["params"]}
            for key in [k for k, v in self.state.items() if id(k) not in viewed and not v]:
                del self.state[key]
            return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._ds_groups is None:
            return super().load_state_dict(state_dict)
        with self._matrix_view():
            super().load_state_dict(state_dict)
            loaded = self.param_groups  # torch rebuilt the group dicts from the saved ones
        for ds_group, group in zip(self._ds_groups, loaded):
            ds_group.update({k: v for k, v in group.items() if k not in _MEMBER_KEYS})

    def telemetry(self) -> dict[str, dict[str, float]]:
        """Per projected matrix, over all ranks. At ZeRO-1/2 on several ranks a matrix's
        numbers live on its owner only, so this is a collective: every rank must call it
        at the same points (the trainer does, on log steps and for its summary)."""
        if self._ds_groups is None:
            return super().telemetry()
        with self._matrix_view():
            local = super().telemetry()
        if not self._sharded:
            return local
        # built on the host and moved once each way: one host sync, not one per matrix
        width = 1 + len(_TELEMETRY_FIELDS)
        table = torch.tensor([[1.0, *(local[name][f] for f in _TELEMETRY_FIELDS)]
                              if name in local else [0.0] * width
                              for name in self._projected_names], dtype=torch.float64)
        # one owner per matrix: the sum is the owner's row
        rows = sum_over_ranks(table.to(self._table_device)).cpu().tolist()
        return {name: {f: (int(v) if f in ("refresh_count", "steps_since_refresh") else v)
                       for f, v in zip(_TELEMETRY_FIELDS, row[1:])}
                for name, row in zip(self._projected_names, rows) if row[0] > 0}


def _named_members(group: dict[str, Any]) -> list[tuple[str | None, torch.Tensor]]:
    names = group.get("param_names") or [None] * len(group["params"])
    return list(zip(names, group["params"]))


def balanced_owners(sizes: list[int], world_size: int) -> list[list[int]]:
    """Indices of the matrices (of ``sizes`` elements) each rank owns, ascending, balanced
    by bytes: the fullest rank sets the length of every slot, so each element it sheds
    is one element less padding on every other rank.

    Largest first onto the least loaded rank, then, while the fullest rank can trade with
    another (x of its matrices of one size for y of the other's of another size) and both
    end below its load, the trade that balances the pair best. A pure function of its
    arguments, so every rank (and a resumed run) computes the same owners. When every size
    occurs a multiple of ``world_size`` times, each rank gets an equal share of each size.
    """
    owners = svd_owners(sizes, world_size)  # the same greedy start
    loads = [sum(sizes[j] for j in owned) for owned in owners]
    while True:
        full = max(range(world_size), key=lambda k: (loads[k], -k))
        trade = _best_trade(sizes, owners[full], loads[full], owners, loads)
        if trade is None:
            return [sorted(owned) for owned in owners]
        other, give, take = trade
        for j in give:
            owners[full].remove(j)
            owners[other].append(j)
        for j in take:
            owners[other].remove(j)
            owners[full].append(j)
        moved = sum(sizes[j] for j in give) - sum(sizes[j] for j in take)
        loads[full] -= moved
        loads[other] += moved


def _best_trade(sizes: list[int], mine: list[int], load: int, owners: list[list[int]],
                loads: list[int]) -> tuple[int, list[int], list[int]] | None:
    """(other rank, matrices to give it, matrices to take from it) that leaves the pair's
    fuller side as empty as possible, and below ``load``; None when no trade does."""
    best, best_peak = None, load
    mine_by_size = _by_size(sizes, mine)
    for other, theirs in enumerate(owners):
        gap = load - loads[other]
        if gap <= 0:
            continue
        theirs_by_size = _by_size(sizes, theirs)
        for s, give in mine_by_size.items():
            others = [(t, js) for t, js in theirs_by_size.items() if t != s]
            for t, take in [(1, []), *others]:  # (1, []): give, take nothing
                for x in range(1, len(give) + 1):
                    even = (x * s - gap // 2) // t  # taking this many (or one more) evens the pair
                    for y in {0, min(max(even, 0), len(take)), min(max(even + 1, 0), len(take))}:
                        moved = x * s - y * t
                        peak = max(load - moved, loads[other] + moved)
                        if 0 < moved < gap and peak < best_peak:
                            best, best_peak = (other, give[:x], take[:y]), peak
    return best


def _by_size(sizes: list[int], owned: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for j in owned:
        out.setdefault(sizes[j], []).append(j)
    return out
