"""LotusAdamW as DeepSpeed's client optimizer: map what DeepSpeed hands it back to matrices.

DeepSpeed replaces the tensors in its client optimizer's param groups before the first
step. At stage 0 with fp32 it keeps the model's parameters; at stage 0 with bf16 it puts
fp32 master copies of the same shapes; at ZeRO-1/2 it flattens each param group into one
buffer, cuts it into equal contiguous partitions, one per rank, and leaves each rank one
flat 1-D fp32 partition per group. A low-rank projection needs matrices.

Whole-matrix ownership (ZeRO-1/2). A group of ``world_size`` projected matrices with the
same number of elements is cut exactly at the matrix boundaries, so every rank's partition
of it is one whole matrix, whose full, already averaged gradient DeepSpeed reduce-scatters
to that rank. The owner runs the single-process Lotus step on it; no rank needs another
rank's part of a matrix, the rSVD, the exact SVD and every switch statistic are local, and
the result is the single-process algorithm's on the same global batch. ``regroup_for_zero``
builds such groups; ``bind`` checks with DeepSpeed's own partition bookkeeping that every
projected partition is one whole matrix and fails at start-up when one is not. Parameters
that are not projected (embeddings, norms, head) form groups whose partitions are arbitrary
flat slices: their AdamW update is elementwise.

ZeRO-3 partitions every parameter across all ranks, so a rank only ever holds a slice of
each matrix; that is FSDP's territory (``parallel.engine=fsdp``) and is refused upstream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from lotus_dist.comm import group_device, sum_over_ranks
from lotus_dist.optim import LotusAdamW

#: Group keys that describe members rather than hyperparameters.
_MEMBER_KEYS = ("params", "param_names")
#: Columns of the telemetry table that ``sync_telemetry`` reduces.
_TELEMETRY_FIELDS = ("refresh_count", "steps_since_refresh", "switch_metric", "energy",
                     "refresh_interval_min", "refresh_interval_mean", "refresh_interval_max")


class PartitionLayoutError(ValueError):
    """A DeepSpeed partition that is not a whole matrix; the message says what to change."""


class ZeroLotusAdamW(LotusAdamW):
    """LotusAdamW whose Lotus step runs on whole matrices whatever DeepSpeed hands it.

    Build it like LotusAdamW (the parameter order fixes each matrix's index, which seeds its
    refreshes, so build it from the same groups as a single-process run), call
    ``regroup_for_zero(world_size)`` before ``deepspeed.initialize`` at ZeRO-1/2, then
    ``bind(engine.optimizer)`` after it. From then on ``param_groups`` are DeepSpeed's
    (the learning-rate schedule writes there) and each step runs the inherited Lotus step on
    the matrix views of the groups DeepSpeed asks to step.

    The finite check needs no collective: DeepSpeed only calls ``step`` after its own global
    overflow check, and at stage 0 every rank holds the same all-reduced gradients.
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
        self._ds_groups: list[dict[str, Any]] | None = None
        self._views: list[list[torch.Tensor]] = []
        self._view_names: list[list[str] | None] = []
        self._sharded = False
        self._table_device: torch.device | None = None  # where sync_telemetry reduces
        self._telemetry: dict[str, dict[str, float]] = {}

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
        """Split every projected group into groups of ``world_size`` matrices of equal size.

        Non-projected groups stay as they are. Raises PartitionLayoutError, naming the
        matrices, when a size class of projected matrices does not split evenly.
        """
        groups: list[dict[str, Any]] = []
        members: list[list[tuple[str | None, torch.Tensor]]] = []
        for group, named in zip(self.param_groups, self._members):
            if "rank" not in group:
                groups.append(group)
                members.append(named)
                continue
            hyper = {k: v for k, v in group.items() if k not in _MEMBER_KEYS}
            for chunk in _ownership_chunks(named, world_size):
                groups.append({**hyper, "params": [p for _, p in chunk],
                               "param_names": [n for n, _ in chunk]})
                members.append(chunk)
        self.param_groups = groups
        self._members = members

    # ----------------------------------------------------------------- after DeepSpeed

    def bind(self, ds_optimizer: Any) -> None:
        """Map the tensors DeepSpeed put into ``param_groups`` back to matrices.

        ``ds_optimizer`` is ``engine.optimizer`` after ``deepspeed.initialize``: this
        optimizer itself (stage 0, fp32), DeepSpeed's per-parameter fp32-master wrapper
        (stage 0, bf16) or its ZeRO-1/2 optimizer. Anything else, or a projected
        partition that is not one whole matrix, raises PartitionLayoutError.
        """
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self._ds_groups = list(self.param_groups)
        if len(self._ds_groups) != len(self._members):
            raise PartitionLayoutError("DeepSpeed changed the number of param groups of "
                                       "LotusAdamW; lotus-dist cannot map them back")
        if isinstance(ds_optimizer, DeepSpeedZeroOptimizer):
            if ds_optimizer.cpu_offload:
                raise PartitionLayoutError("LotusAdamW does not run with ZeRO optimizer "
                                           "offload; remove zero_optimization.offload_optimizer")
            self._sharded = dist.is_initialized() and dist.get_world_size() > 1
            self._table_device = group_device() if self._sharded else None
            mapped = [self._partition_views(ds_optimizer, i) for i in range(len(self._members))]
        elif ds_optimizer is self or isinstance(ds_optimizer, FP16_UnfusedOptimizer):
            mapped = [self._same_shape_views(i) for i in range(len(self._members))]
        else:
            raise PartitionLayoutError(
                f"DeepSpeed wrapped LotusAdamW in {type(ds_optimizer).__name__}, whose layout "
                "lotus-dist cannot map back to matrices (ZeRO-1/2 and stage 0 are supported; "
                "remove data_types.grad_accum_dtype from the DeepSpeed config)")
        self._views = [views for views, _ in mapped]
        self._view_names = [names for _, names in mapped]
        for i, views in enumerate(self._views):
            for view, (_, original) in zip(views, self._members[i]):
                self.alias(view, original, self._ds_groups[i])

    def _same_shape_views(self, i: int) -> tuple[list[torch.Tensor], list[str] | None]:
        """Stage 0: the group holds the parameters or same-shaped fp32 masters, in order."""
        held = self._ds_groups[i]["params"]
        members = self._members[i]
        if [t.shape for t in held] != [p.shape for _, p in members]:
            raise PartitionLayoutError(f"DeepSpeed changed the shapes in param group {i}")
        return list(held), self._ds_groups[i].get("param_names")

    def _partition_views(self, zero: Any, i: int) -> tuple[list[torch.Tensor], list[str] | None]:
        """ZeRO-1/2: one flat fp32 partition; a projected group's must be one whole matrix."""
        (flat,) = self._ds_groups[i]["params"]
        if "rank" not in self._ds_groups[i]:
            return [flat], None  # AdamW is elementwise: any slice of the flat buffer will do
        inside = zero.params_in_partition[i]
        names = {id(p): n for n, p in self._members[i]}
        if (len(inside) != 1 or zero.first_offset[i] != 0
                or inside[0].numel() != zero.partition_size[i]):
            raise PartitionLayoutError(
                f"the ZeRO partition of projected group {i} on this rank is not one whole "
                f"matrix (it spans {[names.get(id(p)) for p in inside]} from offset "
                f"{zero.first_offset[i]}, {zero.partition_size[i]} elements): DeepSpeed padded "
                "or reordered the group. Use parallel.engine=fsdp, or a world size that "
                "divides the number of projected matrices of each size")
        owned = inside[0]
        self._members[i] = [(names[id(owned)], owned)]
        return [flat.detach().view(owned.shape)], [names[id(owned)]]

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
            group["params"] = self._views[i]
            if self._view_names[i] is not None:
                group["param_names"] = self._view_names[i]
            groups.append(group)
            for view, held in zip(self._views[i], ds_group["params"]):
                if view is not held:
                    view.grad = None if held.grad is None else held.grad.view(view.shape)
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
        self.sync_telemetry()

    def telemetry(self) -> dict[str, dict[str, float]]:
        """Per projected matrix, over all ranks (as of the last ``sync_telemetry``)."""
        if self._ds_groups is None:
            return super().telemetry()
        return dict(self._telemetry)

    def sync_telemetry(self) -> None:
        """Collect every matrix's telemetry from its owner; collective at ZeRO-1/2, so call
        it on every rank after each optimizer step (the engine does)."""
        with self._matrix_view():
            local = super().telemetry()
        if not self._sharded:
            self._telemetry = local
            return
        table = torch.zeros(len(self._projected_names), 1 + len(_TELEMETRY_FIELDS),
                            dtype=torch.float64, device=self._table_device)
        for row, name in enumerate(self._projected_names):
            if name in local:
                table[row] = torch.tensor([1.0, *(local[name][f] for f in _TELEMETRY_FIELDS)],
                                          dtype=torch.float64, device=table.device)
        sum_over_ranks(table)  # one owner per matrix: the sum is the owner's row
        self._telemetry = {
            name: {f: (int(v) if f in ("refresh_count", "steps_since_refresh") else float(v))
                   for f, v in zip(_TELEMETRY_FIELDS, row[1:].tolist())}
            for name, row in zip(self._projected_names, table) if row[0] > 0}

    def telemetry_bytes(self) -> int:
        """Bytes ``sync_telemetry`` all-reduces per step (0 where nothing is sharded)."""
        return len(self._projected_names) * (1 + len(_TELEMETRY_FIELDS)) * 8 if self._sharded else 0


def _named_members(group: dict[str, Any]) -> list[tuple[str | None, torch.Tensor]]:
    names = group.get("param_names") or [None] * len(group["params"])
    return list(zip(names, group["params"]))


def _ownership_chunks(named: list[tuple[str | None, torch.Tensor]],
                      world_size: int) -> list[list[tuple[str | None, torch.Tensor]]]:
    """Runs of ``world_size`` equal-sized matrices, in parameter order within each size."""
    by_size: dict[int, list[tuple[str | None, torch.Tensor]]] = {}
    for name, p in named:
        by_size.setdefault(p.numel(), []).append((name, p))
    uneven = {size: ms for size, ms in by_size.items() if len(ms) % world_size}
    if uneven:
        detail = "; ".join(f"{len(ms)} matrices of {size} elements ({ms[0][0] or 'unnamed'}, "
                           "...)" for size, ms in uneven.items())
        raise PartitionLayoutError(
            f"ZeRO-1/2 gives each of the {world_size} ranks one whole projected matrix per "
            f"group of {world_size} equal-sized matrices, but these counts are not multiples "
            f"of {world_size}: {detail}. Use parallel.engine=fsdp (or ddp), or a world size "
            "that divides these counts")
    return [ms[k:k + world_size] for ms in by_size.values()
            for k in range(0, len(ms), world_size)]
