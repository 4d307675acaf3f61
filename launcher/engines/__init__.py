"""Build the model, the optimizer and the engine that ``launcher.capabilities`` resolved.

Construction order matters and lives here, once: the model is built on the meta device
and initialised explicitly, so its weights do not depend on the number of ranks; the
optimizer is built on the parameters the engine will update, with the comm of that
engine (``lotus_dist.comm``) given at construction.
"""

from __future__ import annotations

from launcher.capabilities import RunPlan
from launcher.compile import maybe_compile
from launcher.config import Config, clips_consumed
from launcher.distributed import DistInfo
from launcher.engines.base import Engine, apply_activation_checkpointing, param_dtype
from launcher.optimizer import build_optimizer, prepare_model
from lotus_dist.comm import DataParallelComm
from lotus_dist.model import LlamaConfig, build_model


def build_engine(cfg: Config, model_cfg: LlamaConfig, dist_info: DistInfo,
                 plan: RunPlan) -> Engine:
    """Return a ready engine for ``plan`` (checked: nothing here refuses a setting)."""
    if plan.engine.startswith("deepspeed"):
        from launcher.engines.deepspeed import build_deepspeed_engine

        return build_deepspeed_engine(cfg, model_cfg, dist_info, plan.deepspeed)
    if plan.engine == "fsdp":
        from launcher.engines.fsdp import build_fsdp_engine

        return build_fsdp_engine(cfg, model_cfg, dist_info, plan.accum_steps)
    raw_model = build_model(model_cfg, device=dist_info.device, seed=cfg.training.seed,
                            dtype=param_dtype(cfg.training.dtype))
    prepare_model(cfg.optim, raw_model, cfg.training.seed)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(raw_model)
    maybe_compile(raw_model, cfg)
    check = cfg.parallel.check_consistency
    if plan.engine == "ddp_lowrank":
        from launcher.engines.ddp_lowrank import LowRankDDPEngine
        from lotus_dist.ddp import LowRankDDPComm

        comm = LowRankDDPComm(check_consistency=check)
        optimizer = build_optimizer(cfg.optim, raw_model, cfg.training.seed, comm=comm)
        if cfg.optim.projected_backward:  # before the reducer, which hooks the linears
            optimizer.project_in_backward(raw_model)
        engine: Engine = LowRankDDPEngine(raw_model, optimizer, dist_info)
    elif plan.engine == "ddp":
        from launcher.engines.ddp import DDPEngine

        # ranks hold identical averaged gradients and compute the same bases themselves
        optimizer = build_optimizer(cfg.optim, raw_model, cfg.training.seed,
                                    comm=DataParallelComm(check_consistency=check))
        engine = DDPEngine(raw_model, optimizer, dist_info)
    else:
        optimizer = build_optimizer(cfg.optim, raw_model, cfg.training.seed)
        if cfg.optim.per_layer:
            optimizer.register_per_layer_hooks()
        if cfg.optim.projected_backward:
            optimizer.project_in_backward(raw_model)
        engine = Engine(raw_model, raw_model, optimizer, dist_info)
    engine.clip_consumed = clips_consumed(cfg)
    return engine
