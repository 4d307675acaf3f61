"""Low-rank DDP: no DDP wrapper; projected matrices all-reduce only R (lotus_dist.ddp)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from launcher.distributed import DistInfo
from launcher.engines.base import Engine
from lotus_dist import LotusAdamW
from lotus_dist.comm import BYTES_KINDS
from lotus_dist.ddp import LowRankDDPComm, LowRankReducer


class LowRankDDPEngine(Engine):
    """Order of one step: backward hooks project and send buckets as gradients become
    final (last micro-batch only, so accumulation communicates once); ``clip_grad_norm``
    waits for them, lets the optimizer refresh what is due (distributed rSVD) and clips
    on the norm of what the update consumes; ``optimizer_step`` runs the update.

    ``optimizer`` was built with a ``LowRankDDPComm``; the engine owns the reducer."""

    name = "ddp_lowrank"

    def __init__(self, raw_model: nn.Module, optimizer: LotusAdamW,
                 dist_info: DistInfo) -> None:
        super().__init__(raw_model, raw_model, optimizer, dist_info)
        if not isinstance(optimizer.comm, LowRankDDPComm):
            raise TypeError("LowRankDDPEngine needs an optimizer built with a LowRankDDPComm")
        self.comm: LowRankDDPComm = optimizer.comm
        self.reducer = LowRankReducer(raw_model, optimizer, self.comm)
        self.steps = 0

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.reducer.boundary = last
        yield

    def clip_grad_norm(self, max_norm: float) -> float:
        self.reducer.finish()
        self.steps += 1
        return self.clip_consumed_norm(max_norm)

    def zero_grad(self) -> None:
        self.comm.reset()
        super().zero_grad()

    def comm_bytes_per_step(self) -> dict[str, int]:
        return {k: self.comm.bytes[k] // max(self.steps, 1) for k in BYTES_KINDS}
