"""`lotus-train bench memory`: per-rank bytes of weights, gradients, optimizer state and the
peak refresh workspace, per method, config size, engine and world size.

Nothing is allocated. Each config's model is built on the meta device and its optimizer
from the config, as the trainer builds them. torch's AdamW takes one real step on meta
gradients, so its state is what its own code creates. LotusAdamW's step reads values
(finiteness checks, switch decisions, the rSVD's Gram trace) that meta tensors do not
have, so its state is derived from the layout it documents (``lotus_layout``); every run
first checks that layout against a real CPU step of the tiny model, per parameter: the
same tensors with the same shapes and dtypes, and the same peak of live gradients.

Per rank (rank 0, which holds the largest shards):

* ddp: weights, gradients and state whole on every rank.
* fsdp: weights, gradients and state laid out like them are a shard, ceil(s / W) rows
  of the dimension FSDP shards (``lotus_dist.fsdp.lotus_shard_dim``), at any number of
  micro-batches per step: each one's gradient is reduce-scattered and summed into the
  shards (``parallel.fsdp_grad_accumulation=sharded``). With ``unsharded`` and more than
  one micro-batch, every rank sums whole fp32 gradients between micro-batches: the
  ``grads_unsharded_accum`` column, the whole model's gradients at any W. State in R's space
  (Adam moments, the displacement switch's R_0) is sharded like R where the matrix is
  sharded along the dimension its projection keeps, and whole where FSDP falls back to
  dim 0; bases are sharded by rows (``FSDPComm.store_basis``: a rank gathers one whole
  basis at a time to project its shard, a transient not counted here).
* projected_backward (lotus_pb): outside refresh steps a projected weight has no
  gradient; its linear sums R (R's shape, the compute dtype) over the step's
  micro-batches, so the gradients are the non-projected ones plus every R; under fsdp
  each micro-batch's R is reduce-scattered to the rank's shard (sharded like R, whole
  for a dim-0 fallback matrix).
  A refresh step forms the refreshed matrices' whole gradients (step 1: all of them, as
  without it). Measured against a real tiny run on its second step.
* per_layer: each gradient is freed by its hook right after its update, so the gradients
  are the largest single one. That holds for one micro-batch per step: under gradient
  accumulation the hooks wait for the last micro-batch and every summed gradient is kept.
  The engines run per_layer in one process only, so those rows are W = 1.
* workspace: the largest temporary of one refresh (matrices refresh one at a time), as
  Lotus Table 1 counts it: rSVD keeps a (d + k) x (r + p) sketch and co-sketch (k is
  this rank's columns where FSDP shards the kept dimension) and an (r + p)^2 fp64 Gram;
  an exact SVD copies G and forms U, S, V of k = min(m, n), m k + k + k n, and under
  FSDP first gathers the whole G. LAPACK's work arrays are not counted (``bench
  projector`` measures the real peak).

Everything is fp32: bf16 mixed precision keeps fp32 sharded weights, gradients and
state; its transient bf16 copies of a block, like activations, are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from launcher.config import MODEL_SIZE_NAMES, Config, load_config
from launcher.engines.base import param_dtype
from launcher.optimizer import build_optimizer
from lotus_dist import LotusAdamW
from lotus_dist.fsdp import kept_dim, lotus_shard_dim
from lotus_dist.model import MODEL_SIZES, LlamaConfig, build_model, build_model_on_meta
from lotus_dist.precision import compute_dtype
from lotus_dist.projection import projected_dim, projection_side

GIB = 2**30
CONFIGS = Path("configs")
ENGINES = ("ddp", "fsdp")
CHECK_SIZE = "tiny"
PER_LAYER_TARGET = 0.35  # issue 11: (grads + state) lotus_per_layer / adamw at 7b
SCALING_TOLERANCE = 0.01  # issue 11: fsdp W=8 over W=64 within 1% of 8
PAPER_LOTUS_VS_GALORE = 0.6  # Lotus: "about 40% less memory on gradient and optimizer states"


@dataclass(frozen=True)
class Method:
    """A table entry: a config's ``optim.name``, with ``optim.per_layer`` or
    ``optim.projected_backward`` on or off."""

    label: str
    name: str
    per_layer: bool = False
    projected_backward: bool = False


#: Every method the bench knows; a new one is one more entry.
METHODS = (
    Method("adamw", "adamw"),
    Method("galore", "galore"),
    Method("galore_per_layer", "galore", per_layer=True),
    Method("lotus", "lotus"),
    Method("lotus_per_layer", "lotus", per_layer=True),
    Method("lotus_pb", "lotus", projected_backward=True),
    Method("grasswalk", "grasswalk"),
    Method("grassjump", "grassjump"),
)
DEFAULT_METHODS = "adamw,galore,galore_per_layer,lotus,lotus_per_layer"

Sharding = Literal["param", "lowrank", "rows", "whole"]


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a parameter's optimizer state and how FSDP lays it out: like the
    parameter, like R (the low-rank gradient), by rows (FSDP's bases), or whole on every
    rank."""

    shape: tuple[int, ...]
    itemsize: int
    sharding: Sharding


@dataclass(frozen=True)
class ParamLayout:
    """A parameter as its optimizer holds it; ``side`` and the rest only for projected
    matrices (what a refresh's workspace depends on)."""

    shape: tuple[int, ...]
    itemsize: int
    state: dict[str, StateTensor]
    side: str | None = None
    projection: str | None = None
    rank: int = 0
    oversample: int = 0


@dataclass(frozen=True)
class Usage:
    """Bytes on one rank; ``whole_state`` is the part of ``state`` that is not sharded
    (all of it under ddp; the bases and the fallback's R-space tensors under fsdp)."""

    params: int
    grads: int
    state: int
    workspace: int
    whole_state: int
    grads_unsharded_accum: int | None
    """fsdp: the gradients with ``parallel.fsdp_grad_accumulation=unsharded`` and more
    than one micro-batch per step (``grads`` holds for sharded accumulation)."""

    @property
    def grads_state(self) -> int:
        return self.grads + self.state

    @property
    def resident(self) -> int:
        """What stays allocated between steps plus the gradients of one step."""
        return self.params + self.grads + self.state

    @property
    def with_workspace(self) -> int:
        """Gradients, state and a refresh's workspace: what the paper compares."""
        return self.grads + self.state + self.workspace

    @property
    def transient(self) -> int:
        """Gradients and a refresh's workspace: the peak on top of the state that the
        paper's memory argument counts (per layer: one gradient plus the workspace)."""
        return self.grads + self.workspace


# --------------------------------------------------------------------- configs and models


def config_sizes() -> list[str]:
    """The model sizes that have a config file, smallest first."""
    return [s for s in MODEL_SIZE_NAMES if (CONFIGS / f"{s}.yaml").exists()]


def method_config(size: str, method: Method) -> Config:
    """The config file of ``size`` run with ``method`` (its preset: the paper's rank)."""
    sets = [f"optim.name={method.name}"] + (["optim.per_layer=true"] if method.per_layer else [])
    sets += ["optim.projected_backward=true"] if method.projected_backward else []
    return load_config(CONFIGS / f"{size}.yaml", sets)


def model_config(cfg: Config) -> LlamaConfig:
    """The config's model shape; an unset vocabulary is the sample tokenizer's size."""
    vocab = cfg.model.vocab_size or cfg.data.tokenizer_vocab_size
    return dataclasses.replace(MODEL_SIZES[cfg.model.size], vocab_size=vocab)


# --------------------------------------------------------------------- optimizer state layout

#: R-shaped tensors each switch policy keeps besides Adam's moments (lotus_dist/switching.py).
SWITCH_STATE: dict[str, tuple[str, ...]] = {
    "fixed": (),
    "displacement": ("r_init",),
    "momentum_displacement": ("m_ref",),
}


def lotus_layout(optimizer: LotusAdamW, names: dict[torch.Tensor, str]) -> dict[str, ParamLayout]:
    """LotusAdamW's state after a step, from the layout it documents: a plain parameter
    keeps AdamW's two moments like itself; a projected (m, n) matrix keeps its basis
    (d x r, d the compressed dimension), Adam's moments in R's shape ((r, n) left,
    (m, r) right) and its switch policy's R-shaped tensors, all in the compute dtype."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            shape, itemsize = tuple(p.shape), p.element_size()
            if "rank" not in group:
                moment = StateTensor(shape, itemsize, "param")
                out[names[p]] = ParamLayout(shape, itemsize, {"exp_avg": moment,
                                                              "exp_avg_sq": moment})
                continue
            if group["switch"] not in SWITCH_STATE:
                raise ValueError(f"bench memory: no state layout for switch={group['switch']}; "
                                 "add it to SWITCH_STATE")
            side, rank = projection_side(p.shape, group["proj_type"]), group["rank"]
            compute = compute_dtype(p).itemsize
            r_shape = (rank, shape[1]) if side == "left" else (shape[0], rank)
            low = StateTensor(r_shape, compute, "lowrank")
            state = {key: low for key in ("exp_avg", "exp_avg_sq", *SWITCH_STATE[group["switch"]])}
            state["basis"] = StateTensor((projected_dim(shape, side), rank), compute, "rows")
            out[names[p]] = ParamLayout(shape, itemsize, state, side, group["projection"], rank,
                                        group["oversample"])
    return out


def meta_step_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, ParamLayout]:
    """The state a torch optimizer creates in one step on meta gradients (nothing is
    allocated); a tensor of its parameter's shape is laid out like it, anything else
    (AdamW's step counter) is whole."""
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    optimizer.step()
    out = {}
    for name, p in model.named_parameters():
        state = {key: StateTensor(tuple(v.shape), v.element_size(),
                                  "param" if v.shape == p.shape else "whole")
                 for key, v in optimizer.state[p].items() if torch.is_tensor(v)}
        out[name] = ParamLayout(tuple(p.shape), p.element_size(), state)
    return out


def derived_layout(cfg: Config) -> dict[str, ParamLayout]:
    """Every parameter's layout for ``cfg``, from a meta-device model and its optimizer."""
    model = build_model_on_meta(model_config(cfg)).to(param_dtype(cfg.training.dtype))
    optimizer = build_optimizer(cfg.optim, model, seed=cfg.training.seed)
    if isinstance(optimizer, LotusAdamW):
        return lotus_layout(optimizer, {p: n for n, p in model.named_parameters()})
    return meta_step_layout(optimizer, model)


# --------------------------------------------------------------------- per-rank accounting


def shard_dim(layout: ParamLayout, engine: str, world: int) -> int | None:
    """The dimension FSDP shards a parameter on; None where it is whole on every rank."""
    if engine == "ddp" or world == 1:
        return None
    return 0 if layout.side is None else lotus_shard_dim(layout.shape, layout.side, world)


def local_bytes(shape: tuple[int, ...], itemsize: int, dim: int | None, world: int) -> int:
    """Bytes of rank 0's piece: FSDP and DTensor split like torch.chunk, ceil(s / W) rows."""
    numel = math.prod(shape)
    if dim is None:
        return numel * itemsize
    return numel // shape[dim] * -(-shape[dim] // world) * itemsize


def state_dim(tensor: StateTensor, layout: ParamLayout, dim: int | None) -> int | None:
    """Where a state tensor is sharded, given its parameter's shard dimension ``dim``."""
    if tensor.sharding == "rows":  # FSDPComm.store_basis: this rank's rows of the basis
        return None if dim is None else 0
    if tensor.sharding == "param":
        return dim
    if tensor.sharding == "lowrank" and dim is not None and dim == kept_dim(layout.side):
        return dim  # R keeps the kept dimension at the same index: sharded alike
    return None


def _rsvd_workspace(layout: ParamLayout, d: int, k_local: int, gathered: bool) -> int:
    width = min(layout.rank + layout.oversample, d)
    return (d + k_local) * width * 4 + width * width * 8


def _svd_workspace(layout: ParamLayout, d: int, k_local: int, gathered: bool) -> int:
    m, n = layout.shape
    k = min(m, n)
    return (m * n * (2 if gathered else 1) + m * k + k + k * n) * 4


def _random_workspace(layout: ParamLayout, d: int, k_local: int, gathered: bool) -> int:
    return 2 * d * layout.rank * 4  # the Gaussian and its orthonormal Q


#: Peak temporary fp32 bytes of one refresh by ``projection`` (grassmann's first refresh
#: is an exact SVD, its largest).
WORKSPACE: dict[str, Callable[[ParamLayout, int, int, bool], int]] = {
    "rsvd": _rsvd_workspace,
    "svd": _svd_workspace,
    "grassmann": _svd_workspace,
    "random": _random_workspace,
}


def refresh_workspace(layout: ParamLayout, dim: int | None, world: int) -> int:
    """One refresh of this matrix on one rank, for A = G or G^T of shape (d, k), d the
    compressed dimension; 0 for a parameter that is not projected."""
    if layout.side is None:
        return 0
    d = projected_dim(layout.shape, layout.side)
    k = math.prod(layout.shape) // d
    k_local = -(-k // world) if dim is not None and dim == kept_dim(layout.side) else k
    return WORKSPACE[layout.projection](layout, d, k_local, dim is not None)


def per_rank_usage(layouts: Iterable[ParamLayout], per_layer: bool, engine: str,
                   world: int, projected_backward: bool = False) -> Usage:
    """Rank 0's bytes under ``engine`` on ``world`` ranks (gradients like the weights;
    with ``projected_backward``, R whole in place of a projected weight's gradient)."""
    layouts = list(layouts)
    params = largest = state = whole = workspace = whole_grads = lowrank = 0
    for lay in layouts:
        dim = shard_dim(lay, engine, world)
        own = local_bytes(lay.shape, lay.itemsize, dim, world)
        params += own
        if projected_backward and lay.side is not None:
            r = lay.state["exp_avg"]  # R's shape, in the compute dtype, sharded like R
            lowrank += local_bytes(r.shape, r.itemsize, state_dim(r, lay, dim), world)
            whole_grads += local_bytes(r.shape, r.itemsize, None, world)  # unsharded accum
        else:
            whole_grads += local_bytes(lay.shape, lay.itemsize, None, world)
            largest = max(largest, own)
        for t in lay.state.values():
            t_dim = state_dim(t, lay, dim)
            nbytes = local_bytes(t.shape, t.itemsize, t_dim, world)
            state += nbytes
            whole += nbytes if t_dim is None else 0
        workspace = max(workspace, refresh_workspace(lay, dim, world))
    grads = largest if per_layer else params
    if projected_backward:
        grads = lowrank + sum(local_bytes(lay.shape, lay.itemsize, shard_dim(lay, engine, world),
                                          world) for lay in layouts if lay.side is None)
    return Usage(params, grads, state, workspace, whole,
                 whole_grads if engine == "fsdp" and not per_layer else None)


# --------------------------------------------------------------------- the real-step check


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the tiny check on one intra-op thread: its matrices are too small to share,
    and on a busy machine a second thread only spins waiting (seconds instead of 0.1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def real_step(cfg: Config) -> tuple[dict[str, dict[str, tuple]], int, int]:
    """(state layout, weight bytes, peak bytes of live gradients) after a real step of
    ``cfg`` on CPU; the peak is read by hooks that run before the per-layer updates. With
    the projected backward the second step is measured (the first refreshes every basis
    and forms every gradient), and the R its linears hold count as gradients."""
    model = build_model(model_config(cfg), seed=cfg.training.seed,
                        dtype=param_dtype(cfg.training.dtype))
    optimizer = build_optimizer(cfg.optim, model, seed=cfg.training.seed)
    peak = 0
    sites: list = []

    def record(_: torch.Tensor) -> None:
        nonlocal peak
        live = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
        live += sum(_nbytes(s.lowrank) for s in sites if s.lowrank is not None)
        peak = max(peak, live)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(record)
    if cfg.optim.per_layer:
        optimizer.register_per_layer_hooks()
    if cfg.optim.projected_backward:
        optimizer.project_in_backward(model)
        sites = list(optimizer.projection_sites().values())
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2 if cfg.optim.projected_backward else 1):
        peak = 0
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
    layout = {name: {key: (tuple(v.shape), v.element_size())
                     for key, v in optimizer.state[p].items() if torch.is_tensor(v)}
              for name, p in model.named_parameters()}
    return layout, sum(_nbytes(p) for p in model.parameters()), peak


def shapes(layout: dict[str, ParamLayout]) -> dict[str, dict[str, tuple]]:
    """A derived layout in ``real_step``'s form."""
    return {name: {key: (t.shape, t.itemsize) for key, t in lay.state.items()}
            for name, lay in layout.items()}


def check_against_real_step(method: Method, size: str = CHECK_SIZE) -> dict:
    """Derived bytes against a real CPU step for ``method`` on ``size``; ``problems``
    names every difference (empty: the derived layout is the optimizer's)."""
    cfg = method_config(size, method)
    derived = derived_layout(cfg)
    want = per_rank_usage(derived.values(), method.per_layer, "ddp", 1, method.projected_backward)
    measured, params, peak = real_step(cfg)
    expected = shapes(derived)
    problems = [f"{name}: derived {expected.get(name)}, measured {measured.get(name)}"
                for name in expected.keys() | measured.keys()
                if expected.get(name) != measured.get(name)]
    measured_state = sum(math.prod(s) * b for keys in measured.values() for s, b in keys.values())
    for what, derived_bytes, real_bytes in (("params", want.params, params),
                                            ("grads", want.grads, peak),
                                            ("state", want.state, measured_state)):
        if derived_bytes != real_bytes:
            problems.append(f"{what}: derived {derived_bytes} bytes, measured {real_bytes}")
    return {"method": method.label, "size": size, "params": params, "grads": peak,
            "state": measured_state, "problems": problems}


# --------------------------------------------------------------------- tables and targets


def _ratio(a: int | None, b: int | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def measure(sizes: list[str], methods: list[Method], engines: list[str],
            worlds: list[int]) -> tuple[dict[tuple[str, str, int, str], Usage], dict]:
    """Usage keyed by (size, engine, W, method label), per-layer methods at W = 1 only,
    and the projection rank keyed by (size, method label), 0 where nothing is projected."""
    usage, ranks = {}, {}
    for size in sizes:
        for method in methods:
            layouts = derived_layout(method_config(size, method)).values()
            ranks[size, method.label] = max(lay.rank for lay in layouts)
            for engine in engines:
                for world in worlds:
                    if not method.per_layer or world == 1:
                        usage[size, engine, world, method.label] = per_rank_usage(
                            layouts, method.per_layer, engine, world, method.projected_backward)
    return usage, ranks


def table_rows(usage: dict, ranks: dict[tuple[str, str], int]) -> list[dict]:
    """One row per usage, with ratios against adamw's in the same (size, engine, W)."""
    rows = []
    for (size, engine, world, label), u in usage.items():
        base = usage.get((size, engine, world, "adamw"))
        rows.append({"size": size, "engine": engine, "world_size": world, "method": label,
                     "rank": ranks[size, label], "params": u.params, "grads": u.grads,
                     "grads_unsharded_accum": u.grads_unsharded_accum,
                     "state": u.state, "workspace": u.workspace, "whole_state": u.whole_state,
                     "grads_state_vs_adamw": _ratio(u.grads_state, base and base.grads_state),
                     "total_vs_adamw": _ratio(u.resident + u.workspace,
                                              base and base.resident + base.workspace)})
    return rows


def _get(usage: dict, size: str, engine: str, world: int, label: str,
         attr: str) -> int | None:
    u = usage.get((size, engine, world, label))
    return None if u is None else getattr(u, attr)


def summary_rows(usage: dict, sizes: list[str]) -> list[dict]:
    """Per size at W = 1 (ddp), and fsdp's W=8 / W=64 resident bytes per method."""
    rows = []
    for size in sizes:
        one = {label: u for (s, e, w, label), u in usage.items() if (s, e, w) == (size, "ddp", 1)}
        row = {"size": size}
        for name, a, b, attr in (
                ("lotus_per_layer_vs_adamw", "lotus_per_layer", "adamw", "grads_state"),
                ("lotus_vs_galore", "lotus", "galore", "with_workspace"),
                ("lotus_vs_galore_per_layer", "lotus_per_layer", "galore_per_layer",
                 "with_workspace"),
                ("transient_lotus_vs_galore_per_layer", "lotus_per_layer", "galore_per_layer",
                 "transient"),
                ("workspace_lotus_vs_galore", "lotus", "galore", "workspace")):
            row[name] = _ratio(*(getattr(one[x], attr) if x in one else None for x in (a, b)))
        row["fsdp_w8_over_w64"] = {
            label: _ratio(_get(usage, size, "fsdp", 8, label, "resident"),
                          _get(usage, size, "fsdp", 64, label, "resident"))
            for (s, e, w, label) in usage if (s, e, w) == (size, "fsdp", 8)}
        rows.append(row)
    return rows


def targets(summary: list[dict]) -> dict:
    """Issue 11's targets at 7b (None where the rows were filtered out)."""
    row = next((r for r in summary if r["size"] == "7b"), {})
    per_layer = row.get("lotus_per_layer_vs_adamw")
    scaling = row.get("fsdp_w8_over_w64", {})
    vs_galore = row.get("lotus_vs_galore")
    return {
        "per_layer_vs_adamw": {"value": per_layer, "target": PER_LAYER_TARGET,
                               "pass": None if per_layer is None
                               else per_layer <= PER_LAYER_TARGET},
        "fsdp_scaling": {label: {"value": v, "pass": None if v is None
                                 else abs(v / 8 - 1) <= SCALING_TOLERANCE}
                         for label, v in scaling.items()},
        "lotus_vs_galore": {"value": vs_galore, "paper": PAPER_LOTUS_VS_GALORE,
                            "per_layer": row.get("lotus_vs_galore_per_layer"),
                            "per_layer_transient": row.get("transient_lotus_vs_galore_per_layer"),
                            "pass": None if vs_galore is None
                            else vs_galore <= PAPER_LOTUS_VS_GALORE},
    }


def _verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("PASS" if ok else "FAIL")


def print_report(rows: list[dict], summary: list[dict], goals: dict) -> None:
    print("grads: at any number of micro-batches per step (fsdp: with its default "
          "parallel.fsdp_grad_accumulation=sharded); unsharded accum: fsdp with "
          "parallel.fsdp_grad_accumulation=unsharded and more than one micro-batch per step\n")
    print(f"{'size':>5} {'engine':>6} {'W':>3} {'method':>16} {'rank':>5} {'params GiB':>10} "
          f"{'grads GiB':>9} {'unsharded accum GiB':>19} {'state GiB':>9} "
          f"{'workspace GiB':>13} {'g+s/adamw':>9} {'total/adamw':>11}")
    for r in rows:
        accum = r["grads_unsharded_accum"]
        print(f"{r['size']:>5} {r['engine']:>6} {r['world_size']:>3} {r['method']:>16} "
              f"{r['rank'] or '-':>5} {r['params'] / GIB:10.3f} {r['grads'] / GIB:9.3f} "
              f"{_fmt(None if accum is None else accum / GIB):>19} "
              f"{r['state'] / GIB:9.3f} {r['workspace'] / GIB:13.4f} "
              f"{_fmt(r['grads_state_vs_adamw']):>9} {_fmt(r['total_vs_adamw']):>11}")
    print(f"\n{'size':>5} {'lotus_pl/adamw g+s':>18} {'lotus/galore g+s+w':>18} "
          f"{'pl: lotus/galore':>16} {'pl: g+w lotus/galore':>20} "
          f"{'workspace lotus/galore':>22}  fsdp W8/W64")
    for s in summary:
        scaling = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in s["fsdp_w8_over_w64"].items())
        print(f"{s['size']:>5} {_fmt(s['lotus_per_layer_vs_adamw']):>18} "
              f"{_fmt(s['lotus_vs_galore']):>18} {_fmt(s['lotus_vs_galore_per_layer']):>16} "
              f"{_fmt(s['transient_lotus_vs_galore_per_layer']):>20} "
              f"{_fmt(s['workspace_lotus_vs_galore']):>22}  {scaling or '-'}")
    g = goals["per_layer_vs_adamw"]
    print(f"\ntarget 7b (grads + state) lotus_per_layer / adamw <= {PER_LAYER_TARGET}: "
          f"{_fmt(g['value'])} {_verdict(g['pass'])}")
    for label, s in goals["fsdp_scaling"].items():
        print(f"target 7b fsdp {label} resident W=8 / W=64 = 8 +- 1%: {_fmt(s['value'], 2)} "
              f"{_verdict(s['pass'])}")
    c = goals["lotus_vs_galore"]
    print(f"paper claim 7b (grads + state + workspace) lotus / galore ~{PAPER_LOTUS_VS_GALORE}: "
          f"{_fmt(c['value'])} (per layer {_fmt(c['per_layer'])}; per layer without the state, "
          f"grads + workspace: {_fmt(c['per_layer_transient'])}) {_verdict(c['pass'])}")


def _choose(option: str, known: Iterable[str], what: str) -> list[str]:
    chosen = [x for x in option.split(",") if x]
    unknown = [x for x in chosen if x not in known]
    if unknown:
        sys.exit(f"bench memory: unknown {what} {unknown}; known: {list(known)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(config_sizes()),
                        help="config sizes (configs/<size>.yaml; default all)")
    parser.add_argument("--world-sizes", default="1,8,64", help="ranks per run")
    parser.add_argument("--engines", default=",".join(ENGINES), help="ddp, fsdp")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"any of {', '.join(m.label for m in METHODS)}")
    args = parser.parse_args(argv)
    sizes = _choose(args.sizes, config_sizes(), "size")
    engines = _choose(args.engines, ENGINES, "engine")
    by_label = {m.label: m for m in METHODS}
    methods = [by_label[x] for x in _choose(args.methods, by_label, "method")]
    worlds = [int(w) for w in args.world_sizes.split(",") if w]

    checks = [check_against_real_step(m) for m in methods]
    problems = [f"{c['method']}: {p}" for c in checks for p in c["problems"]]
    if problems:
        sys.exit("bench memory: the derived state differs from a real step of "
                 f"{CHECK_SIZE}:\n" + "\n".join(problems))
    print(f"checked on {CHECK_SIZE}: the derived state of {', '.join(m.label for m in methods)} "
          "equals a real CPU step's (every tensor's shape and dtype, the gradient peak)\n")

    usage, ranks = measure(sizes, methods, engines, worlds)
    rows = table_rows(usage, ranks)
    summary = summary_rows(usage, sizes)
    goals = targets(summary)
    print_report(rows, summary, goals)
    print(json.dumps({"bench": "memory", "unit": "bytes", "check": checks, "rows": rows,
                      "summary": summary, "targets": goals}))
