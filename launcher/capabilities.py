"""What runs where: one table of optimizer x engine x ZeRO stage x options, checked once.

``plan_run`` resolves the engine a run will use, computes the gradient-accumulation steps
and checks every combination against the tables below before anything is built, so an
unsupported setting fails at start-up with a message that names the key and what to use
instead. README.md's engine tables are generated from here (``support_table``), and a
test keeps them equal.

Resolved engines: ``single`` (one process without a process group, ``parallel.engine=
ddp``), ``ddp`` (torch DDP: full-gradient all-reduce), ``ddp_lowrank`` (``parallel.engine=
ddp, lowrank_comm=true`` with a low-rank method), ``fsdp`` and ``deepspeed_zero{0,1,2,3}``.
Under a process group (torchrun, srun) the named engine runs at any world size, 1
included, so one GPU exercises the same collectives as many; ``fsdp`` and ``deepspeed``
make a one-process group when launched without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launcher.config import (
    METHODS,
    PROJECTED_OPTIMIZERS,
    Config,
    ConfigError,
    clips_consumed,
    validate_world_size,
)

ENGINES = ("single", "ddp", "ddp_lowrank", "fsdp", "deepspeed_zero0", "deepspeed_zero1",
           "deepspeed_zero2", "deepspeed_zero3")
_DEEPSPEED = tuple(e for e in ENGINES if e.startswith("deepspeed"))
_ALL_BUT = lambda *out: tuple(e for e in ENGINES if e not in out)  # noqa: E731

_NOT_RSO = tuple(m for m in METHODS if m != "rso")
_RSO_FIX = ("rso's low-rank B linears are not wired into DeepSpeed's engine: use "
            "parallel.engine=fsdp or ddp")

#: The optimizers each engine runs. ZeRO-3 leaves each rank a flat slice of every matrix,
#: so no rank can project a whole gradient (fsdp shards along the kept dimension instead).
OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "single": METHODS, "ddp": METHODS, "ddp_lowrank": PROJECTED_OPTIMIZERS, "fsdp": METHODS,
    "deepspeed_zero0": _NOT_RSO, "deepspeed_zero1": _NOT_RSO, "deepspeed_zero2": _NOT_RSO,
    "deepspeed_zero3": ("adamw",),
}
_OPTIMIZER_FIX = {"deepspeed_zero3": "use parallel.engine=fsdp (ZeRO-3 semantics with "
                                     "per-shard projection) or ZeRO-1/2 "
                                     "(configs/deepspeed/zero2.json)"}


@dataclass(frozen=True)
class Option:
    """A setting that only some engines (or optimizers) can honour."""

    key: str
    """What the user set, as README's table shows it."""
    active: Callable[[Config, dict[str, Any]], bool]
    """Whether ``cfg`` (with the DeepSpeed JSON, {} for other engines) sets it."""
    engines: tuple[str, ...]
    """Resolved engines that honour it."""
    why: str
    """Why the others cannot, and what to do instead (the end of the error message)."""
    optimizers: tuple[str, ...] = METHODS
    """``optim.name`` values it applies to."""


def _ds_zero(ds: dict[str, Any], key: str) -> bool:
    """Whether the DeepSpeed JSON turns on ``zero_optimization.<key>``."""
    value = ds.get("zero_optimization", {}).get(key)
    if isinstance(value, dict):
        return value.get("device", "none") != "none"
    return bool(value)


OPTIONS: tuple[Option, ...] = (
    Option("optim.per_layer=true", lambda c, ds: c.optim.per_layer, ("single",),
           "it steps each weight inside backward, so it runs in one process without "
           "torchrun, with training.grad_clip=0", PROJECTED_OPTIMIZERS),
    Option("optim.per_layer=true with training.grad_clip>0",
           lambda c, ds: c.optim.per_layer and c.training.grad_clip > 0, (),
           "per-layer mode frees each gradient inside backward and clipping needs them all: "
           "set training.grad_clip=0"),
    Option("optim.projected_backward=true", lambda c, ds: c.optim.projected_backward,
           ("single", "ddp_lowrank", "fsdp"),
           "it needs the engine to reduce R (low-rank DDP and FSDP do; torch DDP and DeepSpeed "
           "reduce full gradients): use parallel.engine=fsdp, or ddp with "
           "parallel.lowrank_comm=true, or set optim.projected_backward=false",
           PROJECTED_OPTIMIZERS),
    Option("optim.projected_backward=true with a full-gradient setting",
           lambda c, ds: c.optim.projected_backward and (
               c.optim.per_layer or c.optim.recovery_scaling or c.training.compile
               or c.optim.switch == "path_efficiency" or c.training.clip_on == "gradient"), (),
           "the full gradient exists only on refresh steps, so optim.per_layer, "
           "optim.recovery_scaling, optim.switch=path_efficiency and training.clip_on="
           "gradient cannot run with it, and training.compile does not trace its autograd "
           "function yet: turn those off (clipping uses the consumed norm)",
           PROJECTED_OPTIMIZERS),
    Option("training.compile=true with optim.name=rso",
           lambda c, ds: c.training.compile and c.optim.name == "rso", (),
           "RSO's linears share x P through a Python-side cache that compile does not trace: "
           "set training.compile=false"),
    Option("training.clip_on=consumed", lambda c, ds: c.training.clip_on == "consumed",
           _ALL_BUT(*_DEEPSPEED),
           "DeepSpeed clips the full gradient inside its step: set training.clip_on=auto",
           PROJECTED_OPTIMIZERS),
    Option("training.clip_on=gradient", lambda c, ds: c.training.clip_on == "gradient",
           _ALL_BUT("ddp_lowrank"),
           "low-rank DDP never forms the full mean gradient, so it clips on what the update "
           "consumes: set training.clip_on=auto or consumed (or parallel.lowrank_comm=false)"),
    Option("optim.switch=path_efficiency", lambda c, ds: c.optim.switch == "path_efficiency",
           _ALL_BUT("ddp_lowrank"),
           "it needs the full mean gradient on every rank, which low-rank DDP never forms: "
           "set parallel.lowrank_comm=false (or use parallel.engine=fsdp)",
           PROJECTED_OPTIMIZERS),
    Option("optim.recovery_scaling=true", lambda c, ds: c.optim.recovery_scaling,
           _ALL_BUT("ddp_lowrank"),
           "it needs the full residual on every rank, which low-rank DDP never forms: set "
           "parallel.lowrank_comm=false (or use parallel.engine=fsdp)", PROJECTED_OPTIMIZERS),
    Option("parallel.mixed_precision=bf16", lambda c, ds: c.parallel.mixed_precision == "bf16",
           ("fsdp",), "it is FSDP2's MixedPrecisionPolicy; elsewhere set training.dtype=bf16"),
    Option("parallel.fsdp_shard_bases=false", lambda c, ds: not c.parallel.fsdp_shard_bases,
           ("fsdp",), "only FSDP shards bases; remove it"),
    Option("parallel.activation_checkpointing=true",
           lambda c, ds: c.parallel.activation_checkpointing, _ALL_BUT(*_DEEPSPEED),
           "the deepspeed engine does not apply it: use parallel.engine=fsdp or ddp, or set "
           "it to false"),
    Option("parallel.check_consistency=true", lambda c, ds: c.parallel.check_consistency,
           ("single", "ddp", "ddp_lowrank", "fsdp"),
           "it compares the ranks' replicated bases, and under deepspeed each basis lives "
           "on one rank: use parallel.engine=ddp or fsdp"),
    Option("zero_optimization.offload_optimizer",
           lambda c, ds: _ds_zero(ds, "offload_optimizer"), (),
           "Lotus does not run with ZeRO offload: remove it or use parallel.engine=fsdp",
           PROJECTED_OPTIMIZERS),
    Option("zero_optimization.offload_param", lambda c, ds: _ds_zero(ds, "offload_param"), (),
           "Lotus does not run with ZeRO offload: remove it or use parallel.engine=fsdp",
           PROJECTED_OPTIMIZERS),
    Option("zero_optimization.elastic_checkpoint",
           lambda c, ds: _ds_zero(ds, "elastic_checkpoint"), (),
           "it re-partitions optimizer state by position, which breaks the per-matrix state: "
           "remove it", PROJECTED_OPTIMIZERS),
    Option("zero_optimization.round_robin_gradients",
           lambda c, ds: _ds_zero(ds, "round_robin_gradients"), (),
           "it reorders the param groups that lotus-dist lays out rank by rank, so that each "
           "partition is whole matrices: remove it", PROJECTED_OPTIMIZERS),
)


@dataclass(frozen=True)
class RunPlan:
    """What a run executes, decided once before anything is built."""

    engine: str
    """The resolved engine (``ENGINES``)."""
    accum_steps: int
    """Micro-batches per rank per optimizer step."""
    grouped: bool
    """Whether the run has (or makes) a process group."""
    deepspeed: dict[str, Any] | None = None
    """The DeepSpeed JSON with lotus-train's keys filled (deepspeed only)."""


def resolve_engine(cfg: Config, grouped: bool, zero_stage: int | None = None) -> str:
    """The engine ``cfg`` runs on with (``grouped``) or without a process group."""
    p = cfg.parallel
    if p.engine == "deepspeed":
        return f"deepspeed_zero{zero_stage}"
    if p.engine == "fsdp":
        return "fsdp"
    if not grouped:
        return "single"
    return "ddp_lowrank" if p.lowrank_comm and cfg.optim.name in PROJECTED_OPTIMIZERS else "ddp"


def plan_run(cfg: Config, world_size: int, grouped: bool, device: Any) -> RunPlan:
    """Resolve the engine, compute the accumulation steps and refuse what cannot run."""
    accum = validate_world_size(cfg, world_size)
    ds = None
    if cfg.parallel.engine == "deepspeed":
        from launcher.engines.deepspeed import deepspeed_config, zero_stage

        ds = deepspeed_config(cfg, accum, device)
    engine = resolve_engine(cfg, grouped, zero_stage(ds) if ds is not None else None)
    check_supported(cfg, engine, ds)
    return RunPlan(engine, accum, grouped or cfg.parallel.engine != "ddp", ds)


def check_supported(cfg: Config, engine: str, deepspeed_json: dict[str, Any] | None = None
                    ) -> None:
    """Raise ConfigError naming the first setting ``engine`` cannot honour."""
    if engine not in OPTIMIZERS:
        raise ConfigError(f"unknown engine {engine} (zero_optimization.stage must be 0-3)")
    name = cfg.optim.name
    if name not in OPTIMIZERS[engine]:
        runs = ", ".join(OPTIMIZERS[engine])
        raise ConfigError(f"optim.name={name} does not run on {_label(engine)} (it runs "
                          f"{runs}): " + (_RSO_FIX if name == "rso" else
                                          _OPTIMIZER_FIX.get(engine, "choose another engine")))
    for option in OPTIONS:
        if not option.active(cfg, deepspeed_json or {}):
            continue
        if name not in option.optimizers:
            raise ConfigError(f"{option.key} needs a projected-gradient optim.name "
                              f"({', '.join(option.optimizers)}); optim.name={name}")
        if engine not in option.engines:
            raise ConfigError(f"{option.key} is not available on {_label(engine)}: "
                              f"{option.why}")


def clip_mode(cfg: Config) -> str:
    """What the run clips on, for the start-up line."""
    if cfg.training.grad_clip <= 0:
        return "no clipping"
    kind = "consumed" if clips_consumed(cfg) else "gradient"
    return f"clip {kind} norm at {cfg.training.grad_clip:g}"


def support_table() -> str:
    """README's table of which optimizer runs on which engine and option (markdown)."""
    cols = ENGINES
    lines = ["| | " + " | ".join(f"`{e}`" for e in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for name in METHODS:
        cells = ["yes" if name in OPTIMIZERS[e] else "no" for e in cols]
        lines.append(f"| `optim.name={name}` | " + " | ".join(cells) + " |")
    for option in OPTIONS:
        cells = ["yes" if e in option.engines else "no" for e in cols]
        only = "" if option.optimizers == METHODS else " (projected-gradient methods)"
        lines.append(f"| `{option.key}`{only} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(engine: str) -> str:
    if engine.startswith("deepspeed"):
        return f"DeepSpeed ZeRO-{engine[-1]}"
    return {"single": "one process", "ddp": "parallel.engine=ddp",
            "ddp_lowrank": "low-rank DDP (parallel.engine=ddp, lowrank_comm=true)",
            "fsdp": "parallel.engine=fsdp"}[engine]
