"""Build the optimizer that ``optim.name`` asks for."""

from __future__ import annotations

import torch
from torch import nn

from launcher.config import OptimConfig
from lotus_dist import LotusAdamW, lotus_param_groups
from lotus_dist.comm import LocalComm
from lotus_dist.rso import RSOAdamW, install_rso


def build_optimizer(cfg: OptimConfig, model: nn.Module, seed: int,
                    comm: LocalComm | None = None) -> torch.optim.Optimizer:
    """adamw: torch's AdamW (the full-rank baseline). Every other method is LotusAdamW on
    the ``target_modules`` weights, with the group options the config holds: the method's
    preset (``launcher.config.METHOD_PRESETS``) put them there, so galore is exact SVD on a
    fixed interval with kept moments (GaLore's algorithm), grasswalk a Grassmann walk and
    grassjump a random basis every ``update_proj_gap`` steps with rotated moments and
    recovery scaling, and lotus what it is configured to be; a key set over the preset
    runs as set. Build configs in code with ``method_optim_config(name)``. ``comm`` is the
    engine's (``lotus_dist.comm``); torch's AdamW needs none."""
    common = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps,
              "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw":
        return torch.optim.AdamW(model.parameters(), **common)
    if cfg.name == "rso":  # the model went through prepare_model; its B's are the subproblems
        return RSOAdamW(model, **common, period_steps=cfg.update_proj_gap,
                        proximal=cfg.proximal, seed=seed)
    groups = lotus_param_groups(model, cfg.rank, cfg.target_modules, **group_options(cfg))
    return LotusAdamW(groups, seed=seed, nonfinite=cfg.nonfinite, per_layer=cfg.per_layer,
                      comm=comm, **common)


def prepare_model(cfg: OptimConfig, model: nn.Module, seed: int) -> None:
    """What a method changes in the model before any wrapper sees it: optim.name=rso makes
    the targeted linears RSO linears (``lotus_dist.rso``). On the meta device (FSDP) the
    caller fills them after allocation with ``start_period(model, seed, 0)``."""
    if cfg.name == "rso":
        install_rso(model, cfg.rank, cfg.target_modules, seed)


def group_options(cfg: OptimConfig) -> dict:
    """LotusAdamW's projected-group options (besides ``rank``) for a low-rank method."""
    return {"update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale,
            "proj_type": cfg.proj_type, "projection": cfg.projection, "switch": cfg.switch,
            "gamma": cfg.gamma, "verify_gap": cfg.verify_gap, "min_gap": cfg.min_gap,
            "power_iters": cfg.power_iters, "oversample": cfg.oversample,
            "moments": cfg.moments, "recovery_scaling": cfg.recovery_scaling,
            "recovery_limiter": cfg.recovery_limiter, "walk_step": cfg.walk_step}
