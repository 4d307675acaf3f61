"""Everything a checkpoint holds, as Stateful objects under flat keys.

DCP loads in place into the structure it is given, so each object must present the
same keys before a load as it had at the save: the model and optimizer go through
torch.distributed.checkpoint.state_dict, which also initialises empty optimizer state
(a zero-lr step) and handles DDP/FSDP wrappers and DTensor shards.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass
class TrainState:
    """Counters that must survive a restart."""

    step: int = 0
    """Optimizer steps completed."""
    tokens_seen: int = 0
    """Training tokens consumed, over all ranks."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient, over the whole run."""
    lr_scale: float = 1.0
    """Learning-rate multiplier left by rollbacks (training.on_divergence=rollback)."""
    rollbacks: int = 0
    """Rollbacks to an earlier checkpoint after a divergence."""
    train_seconds: float = 0.0
    """Wall time spent training, over all sessions of the run."""
    initial_eval_loss: float = math.nan
    """Eval loss before the first step (for the summary)."""
    initial_eval_ppl: float = math.nan
    """Eval perplexity before the first step."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class ModelState:
    """The model's (possibly sharded) weights, unwrapped from DDP/FSDP names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """Optimizer state keyed by parameter name (skips are counted in TrainState)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class JsonState:
    """A state whose lists change length (the data loader's carry-over tokens) as one
    JSON string: DCP loads tensors and nested containers in place, so their shape must
    not change between save and load, while a string is stored and replaced whole."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, str]:
        return {"json": json.dumps(self.obj.state_dict())}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.obj.load_state_dict(json.loads(state["json"]))
