"""Low-rank DDP: no DDP wrapper; projected matrices all-reduce only R (lotus_dist.ddp)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import nn

from launcher.distributed import DistInfo
from launcher.engines.base import Engine
from lotus_dist import LotusAdamW
from lotus_dist.ddp import BYTES_KINDS, LowRankDDPComm


class LowRankDDPEngine(Engine):
    """Order of one step: backward hooks project and send buckets as gradients become
    final (last micro-batch only, so accumulation communicates once); ``clip_grad_norm``
    waits for them, lets the optimizer refresh what is due (distributed rSVD) and clips
    on the norm of what the update consumes; ``optimizer_step`` runs the update."""

    name = "ddp_lowrank"

    def __init__(self, raw_model: nn.Module, optimizer: LotusAdamW, dist_info: DistInfo, *,
                 check_consistency: bool = False) -> None:
        super().__init__(raw_model, raw_model, optimizer, dist_info)
        self.comm = LowRankDDPComm(raw_model, optimizer, check_consistency=check_consistency)
        optimizer.comm = self.comm
        self.steps = 0

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.comm.boundary = last
        yield

    def clip_grad_norm(self, max_norm: float) -> float:
        self.comm.finish()
        self.steps += 1
        if not self.optimizer.prepare():
            return math.nan  # non-finite somewhere: every rank skips (comm.agree)
        norm = self.optimizer.consumed_grad_norm()
        if max_norm > 0 and norm > max_norm:
            self.optimizer.scale_consumed_grads(max_norm / (norm + 1e-6))
        return norm

    def zero_grad(self) -> None:
        self.comm.reset()
        super().zero_grad()

    def comm_bytes_per_step(self) -> dict[str, int]:
        return {k: self.comm.bytes[k] // max(self.steps, 1) for k in BYTES_KINDS}
