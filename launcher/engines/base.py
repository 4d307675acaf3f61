"""The engine interface: how one optimizer step is carried out for a parallelism.

The trainer only calls these methods, so the loop reads the same for one process, DDP,
low-rank DDP, FSDP and DeepSpeed; each engine module wires its parallelism top to bottom.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from launcher.distributed import DistInfo
from launcher.train_state import ModelState, OptimizerState
from lotus_dist import LotusAdamW


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward instead of saving its activations.

    The composable API adds hooks instead of a wrapper, so parameter names (init seeds,
    checkpoints, optimizer groups) stay those of a bare ``Llama``; applied before any
    parallel wrapper, so the recomputation runs after FSDP's pre-backward all-gather."""
    from torch.distributed._composable import checkpoint

    for block in model.layers:
        checkpoint(block)


def param_dtype(training_dtype: str) -> torch.dtype:
    """The parameters' dtype: fp64 for ``training.dtype=fp64`` (model and optimizer in
    float64, for exactness tests), else fp32 (bf16 runs autocast their compute)."""
    return torch.float64 if training_dtype == "fp64" else torch.float32


class Engine:
    """One process (and the base of the others): plain autograd, no communication.

    Attributes:
        model: the module the forward pass calls (wrapped where the engine wraps).
        raw_model: the underlying ``Llama`` (parameter names, FLOPs).
        optimizer: the optimizer the step updates.
    """

    name = "single"

    def __init__(self, model: nn.Module, raw_model: nn.Module,
                 optimizer: torch.optim.Optimizer, dist_info: DistInfo) -> None:
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.dist = dist_info
        self.per_layer = isinstance(optimizer, LotusAdamW) and optimizer.per_layer
        #: Clip on the norm of what the update consumes (R for projected matrices)
        #: instead of the full gradient (training.clip_on=consumed).
        self.clip_consumed = False

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; ``last`` closes the step."""
        if self.per_layer:
            self.optimizer.accumulation_boundary = last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Finish the step's gradient communication; return the global gradient norm,
        clipping to ``max_norm`` when it is > 0. nan in per-layer mode (gradients are
        consumed inside backward) and when a gradient is non-finite."""
        if self.per_layer:
            self.optimizer.settle_nonfinite()  # the step's skips, counted (or raised) now
            return math.nan
        if self.clip_consumed:
            return self.clip_consumed_norm(max_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))

    def clip_consumed_norm(self, max_norm: float) -> float:
        """``prepare()`` the optimizer step and clip on the norm of what the update
        consumes (R for projected matrices); nan when a gradient is non-finite (every
        rank skips: the optimizer's comm agrees on it)."""
        if not self.optimizer.prepare():
            return math.nan
        norm = self.optimizer.consumed_grad_norm()
        if max_norm > 0 and norm > max_norm:
            self.optimizer.scale_consumed_grads(max_norm / (norm + 1e-6))
        return norm

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_items(self) -> dict[str, Any]:
        """Model and optimizer state for the checkpoint, as Stateful objects."""
        return {"model": ModelState(self.model),
                "optimizer": OptimizerState(self.model, self.optimizer)}

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Bytes each rank puts into collectives per optimizer step, by kind."""
        return {}
