"""Build the optimizer that ``optim.name`` asks for."""

from __future__ import annotations

import torch
from torch import nn

from launcher.config import OptimConfig
from lotus_dist import LotusAdamW, lotus_param_groups


def build_optimizer(cfg: OptimConfig, model: nn.Module, seed: int) -> torch.optim.Optimizer:
    """adamw: torch's AdamW (the full-rank baseline); galore: LotusAdamW with exact SVD on a
    fixed interval (GaLore's algorithm); lotus: LotusAdamW with the configured projection
    and switch. Both low-rank ones project the ``target_modules`` weights only."""
    common = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps,
              "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw":
        return torch.optim.AdamW(model.parameters(), **common)
    projected = {"update_proj_gap": cfg.update_proj_gap, "scale": cfg.scale,
                 "proj_type": cfg.proj_type}
    if cfg.name == "galore":
        projected |= {"projection": "svd", "switch": "fixed", "moments": "keep"}
    else:
        projected |= {"projection": cfg.projection, "switch": cfg.switch, "gamma": cfg.gamma,
                      "verify_gap": cfg.verify_gap, "min_gap": cfg.min_gap,
                      "power_iters": cfg.power_iters, "oversample": cfg.oversample,
                      "moments": cfg.moments, "recovery_scaling": cfg.recovery_scaling,
                      "recovery_limiter": cfg.recovery_limiter, "walk_step": cfg.walk_step}
    groups = lotus_param_groups(model, cfg.rank, cfg.target_modules, **projected)
    return LotusAdamW(groups, seed=seed, nonfinite=cfg.nonfinite, per_layer=cfg.per_layer,
                      **common)
