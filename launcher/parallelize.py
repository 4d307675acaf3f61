"""Wrap the model for the chosen engine; one function per engine, read top to bottom."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.config import Config, ConfigError
from launcher.distributed import DistInfo


def parallelize(model: nn.Module, cfg: Config, dist_info: DistInfo) -> nn.Module:
    """Return the model to train: bare in one process, DDP-wrapped on several ranks."""
    engine = cfg.parallel.engine
    if engine != "ddp":
        raise ConfigError(f"parallel.engine={engine!r} is not available in this build; "
                          "use parallel.engine=ddp")
    if dist_info.world_size == 1:
        return model
    return parallelize_ddp(model, dist_info)


def parallelize_ddp(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """Replicated weights; gradients are averaged in full by DDP's bucketed all-reduce,
    overlapping backward. Training calls ``no_sync`` on all but the last micro-batch."""
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
