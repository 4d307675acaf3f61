"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore's C4 recipe)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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


def build_lr_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float) -> LambdaLR:
    """LambdaLR over ``lr_factor``; call ``step()`` once per optimizer step.

    The lambda is a plain function, so ``state_dict()`` holds the step count and base lrs
    but not the schedule's shape: a resumed run follows the warmup, steps and floor of
    its current config (so ``training.steps`` can be extended on resume).
    """
    return LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_lr_ratio))
