"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore's C4 recipe)."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` completed optimizer steps.

    Warmup reaches the peak on the last warmup step ((step + 1) / warmup_steps), so the
    first update is not wasted at lr 0; the cosine then falls from 1 at ``warmup_steps``
    to ``min_lr_ratio`` at ``total_steps`` and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets each param group's lr to its peak x ``scale`` x ``lr_factor(step)``.

    Only the step count is restored from a checkpoint: the shape (peak lr, warmup, steps,
    floor) always comes from the current config, so ``--set optim.lr=...`` or a longer
    ``training.steps`` applies on resume. ``load_state_dict`` keeps the checkpoint's
    settings in ``resumed_settings`` so the trainer can say what changed. ``scale`` is
    the rollback multiplier (training.on_divergence=rollback), 1 otherwise.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float) -> None:
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.warmup_steps, self.total_steps, self.min_lr_ratio = (
            warmup_steps, total_steps, min_lr_ratio)
        self.step_count = 0
        self.scale = 1.0
        self.resumed_settings: dict[str, Any] | None = None
        self.apply()

    def settings(self) -> dict[str, Any]:
        return {"peak_lr": self.base_lrs[0], "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "min_lr_ratio": self.min_lr_ratio}

    def apply(self) -> None:
        """Write the lr of the current step into every param group."""
        factor = self.scale * lr_factor(self.step_count, self.warmup_steps, self.total_steps,
                                        self.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        """Call once per optimizer step, skipped steps included (the data advanced too)."""
        self.step_count += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, **self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.resumed_settings = {k: v for k, v in state.items() if k != "step"}
        self.apply()  # the optimizer's param groups came back with the checkpoint's lr

    def changes_on_resume(self) -> list[str]:
        """'optim.lr 0.01 -> 0.005'-style notes for settings that differ from the
        checkpoint's (empty when nothing changed or nothing was loaded)."""
        if self.resumed_settings is None:
            return []
        names = {"peak_lr": "optim.lr", "warmup_steps": "training.warmup_steps",
                 "total_steps": "training.steps", "min_lr_ratio": "training.min_lr_ratio"}
        now = self.settings()
        return [f"{names[k]} {old} -> {now[k]}" for k, old in self.resumed_settings.items()
                if k in now and old != now[k]]


def build_lr_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float) -> LRSchedule:
    """The schedule of ``optimizer``; call ``step()`` once per optimizer step."""
    return LRSchedule(optimizer, warmup_steps, total_steps, min_lr_ratio)
