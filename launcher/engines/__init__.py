"""Build the model, the optimizer and the engine that ``parallel.engine`` asks for.

Construction order matters and lives here, once: the model is built on the meta device
and initialised explicitly, so its weights do not depend on the number of ranks; the
optimizer is built on the parameters the engine will update.
"""

from __future__ import annotations

from launcher.config import Config, ConfigError
from launcher.distributed import DistInfo
from launcher.engines.base import Engine
from launcher.optimizer import build_optimizer
from lotus_dist.model import LlamaConfig, build_model


def build_engine(cfg: Config, model_cfg: LlamaConfig, dist_info: DistInfo) -> Engine:
    """Return a ready engine; unsupported combinations fail here, before any step."""
    engine = cfg.parallel.engine
    if cfg.optim.per_layer and (cfg.training.grad_clip > 0 or dist_info.world_size > 1):
        raise ConfigError("optim.per_layer=true steps each weight inside backward: it needs "
                          "training.grad_clip=0 and a single process")
    if engine != "ddp":
        raise ConfigError(f"parallel.engine={engine!r} is not available in this build; "
                          "use parallel.engine=ddp")
    raw_model = build_model(model_cfg, device=dist_info.device, seed=cfg.training.seed)
    optimizer = build_optimizer(cfg.optim, raw_model, seed=cfg.training.seed)
    if cfg.optim.per_layer:
        optimizer.register_per_layer_hooks()
    if dist_info.world_size == 1:
        return Engine(raw_model, raw_model, optimizer, dist_info)
    from launcher.engines.ddp import DDPEngine

    return DDPEngine(raw_model, optimizer, dist_info)
