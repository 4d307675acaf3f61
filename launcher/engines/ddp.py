"""DDP: replicated weights, gradients averaged in full by DDP's bucketed all-reduce."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.distributed import DistInfo
from launcher.engines.base import Engine


class DDPEngine(Engine):
    """DDP's reducer overlaps the all-reduce with backward; ``no_sync`` on all but the last
    micro-batch makes gradient accumulation communicate once per optimizer step.

    ``gradient_as_bucket_view``: the gradients are views into DDP's all-reduce buckets,
    not a second full copy that each backward copies into. ``forward_sync_buffers=False``
    (torch 2.13's name for ``broadcast_buffers``): the model's only buffers are the rotary
    tables, which every rank computes from the config alike (``Llama.init_buffers``), so
    broadcasting them before every forward (eval included) would move bytes and
    synchronise for nothing (DDP still broadcasts them once, at construction).
    """

    name = "ddp"

    def __init__(self, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                 dist_info: DistInfo) -> None:
        device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
        ddp = DistributedDataParallel(raw_model, device_ids=device_ids,
                                      gradient_as_bucket_view=True, forward_sync_buffers=False)
        super().__init__(ddp, raw_model, optimizer, dist_info)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        with super().micro_batch(last), (contextlib.nullcontext() if last
                                         else self.model.no_sync()):
            yield

    def comm_bytes_per_step(self) -> dict[str, int]:
        # only what has a gradient is all-reduced (rso: B, never the frozen W)
        return {"full_gradients": sum(p.numel() * p.element_size()
                                      for p in self.raw_model.parameters() if p.requires_grad)}
