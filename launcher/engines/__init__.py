"""Build the model, the optimizer and the engine that ``parallel.engine`` asks for.

Construction order matters and lives here, once: the model is built on the meta device
and initialised explicitly, so its weights do not depend on the number of ranks; the
optimizer is built on the parameters the engine will update.
"""

from __future__ import annotations

from launcher.config import PROJECTED_OPTIMIZERS, Config, ConfigError, clips_consumed
from launcher.distributed import DistInfo
from launcher.engines.base import Engine, param_dtype
from launcher.optimizer import build_optimizer
from lotus_dist import LotusAdamW
from lotus_dist.comm import DataParallelComm
from lotus_dist.model import LlamaConfig, build_model


def build_engine(cfg: Config, model_cfg: LlamaConfig, dist_info: DistInfo) -> Engine:
    """Return a ready engine; unsupported combinations fail here, before any step."""
    engine = cfg.parallel.engine
    if cfg.optim.per_layer and (cfg.training.grad_clip > 0 or dist_info.world_size > 1):
        raise ConfigError("optim.per_layer=true steps each weight inside backward: it needs "
                          "training.grad_clip=0 and a single process")
    if engine == "deepspeed":
        from launcher.engines.deepspeed import build_deepspeed_engine

        return build_deepspeed_engine(cfg, model_cfg, dist_info)
    if engine == "fsdp" and dist_info.world_size > 1:  # one process: the plain engine below
        from launcher.engines.fsdp import build_fsdp_engine

        return build_fsdp_engine(cfg, model_cfg, dist_info)
    raw_model = build_model(model_cfg, device=dist_info.device, seed=cfg.training.seed,
                            dtype=param_dtype(cfg.training.dtype))
    optimizer = build_optimizer(cfg.optim, raw_model, seed=cfg.training.seed)
    if cfg.optim.per_layer:
        optimizer.register_per_layer_hooks()
    lowrank = (dist_info.world_size > 1 and cfg.parallel.lowrank_comm
               and cfg.optim.name in PROJECTED_OPTIMIZERS)
    clip_on = cfg.training.clip_on
    if lowrank:
        _check_lowrank_ddp(cfg)
    elif clip_on == "consumed" and cfg.optim.name not in PROJECTED_OPTIMIZERS:
        raise ConfigError("training.clip_on=consumed needs a low-rank optim.name ("
                          f"{', '.join(PROJECTED_OPTIMIZERS)})")
    if dist_info.world_size == 1:
        engine = Engine(raw_model, raw_model, optimizer, dist_info)
    elif lowrank:
        from launcher.engines.ddp_lowrank import LowRankDDPEngine

        return LowRankDDPEngine(raw_model, optimizer, dist_info,
                                check_consistency=cfg.parallel.check_consistency)
    else:
        from launcher.engines.ddp import DDPEngine

        if isinstance(optimizer, LotusAdamW):  # every rank computes the same bases itself
            optimizer.comm = DataParallelComm(check_consistency=cfg.parallel.check_consistency)
        engine = DDPEngine(raw_model, optimizer, dist_info)
    engine.clip_consumed = clips_consumed(cfg)
    return engine


def _check_lowrank_ddp(cfg: Config) -> None:
    """What low-rank DDP cannot do: every rank holds only its own gradient summand."""
    o = cfg.optim
    if cfg.training.clip_on == "gradient":
        raise ConfigError("parallel.lowrank_comm=true never forms the full mean gradient, so "
                          "it clips on what the update consumes: set training.clip_on=auto "
                          "or consumed (or parallel.lowrank_comm=false)")
    if o.switch == "path_efficiency" or o.recovery_scaling:
        key = "optim.switch=path_efficiency" if o.switch == "path_efficiency" else \
            "optim.recovery_scaling=true"
        raise ConfigError(f"{key} needs the full mean gradient on every rank, which "
                          "parallel.lowrank_comm=true never forms: set "
                          "parallel.lowrank_comm=false (or use parallel.engine=fsdp)")
