"""Telling good steps from bad ones, and when a run has diverged.

A bad step is one skipped for a non-finite loss or gradient, or a loss spike: a finite
loss above ``spike_factor`` times the running mean of recent good losses (the update
of a spike is applied; it only counts). Large pre-training runs lose days when a
diverging run keeps checkpointing and prunes its last good checkpoint, so the trainer
asks this guard before it saves (``may_save``) and after every step (``diverged``).

Every input is a value all ranks agreed on (the reduced loss, the agreed skip flag), so
every rank reaches the same verdicts without another collective.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

EMA_DECAY = 0.9
"""Weight of the past in the running mean of good losses (about the last ten steps)."""
SPIKE_WARMUP = 5
"""Good steps the running mean needs before a spike can be called."""


@dataclass
class HealthState:
    """The guard's memory; saved in checkpoints under ``health``."""

    loss_ema: float = math.nan
    """Running mean of the good losses."""
    good_steps: int = 0
    """Good steps seen (the running mean's warm-up)."""
    bad_streak: int = 0
    """Bad steps in a row up to now."""
    last_bad_step: int = -1
    """The most recent bad step; -1 when there was none."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class DivergenceGuard:
    """Args:
        max_bad_streak: more bad steps in a row than this is divergence
            (training.max_skipped_steps).
        spike_factor: the loss-spike threshold (training.spike_factor; 0 turns it off).
        healthy_steps: good steps in a row a save waits for (checkpoint.healthy_steps).
    """

    def __init__(self, max_bad_streak: int, spike_factor: float, healthy_steps: int) -> None:
        self.max_bad_streak, self.spike_factor = max_bad_streak, spike_factor
        self.healthy_steps = healthy_steps
        self.state = HealthState()

    def is_spike(self, loss: float) -> bool:
        s = self.state
        return (self.spike_factor > 0 and s.good_steps >= SPIKE_WARMUP
                and loss > self.spike_factor * s.loss_ema)

    def record(self, step: int, loss: float, skipped: bool) -> bool:
        """Account for ``step``; return True when it was bad."""
        s = self.state
        bad = skipped or not math.isfinite(loss) or self.is_spike(loss)
        if bad:
            s.bad_streak += 1
            s.last_bad_step = step
        else:
            s.bad_streak = 0
            s.good_steps += 1
            s.loss_ema = loss if math.isnan(s.loss_ema) else (
                EMA_DECAY * s.loss_ema + (1 - EMA_DECAY) * loss)
        return bad

    @property
    def diverged(self) -> bool:
        return self.state.bad_streak > self.max_bad_streak

    @property
    def streak_start(self) -> int:
        """First step of the current run of bad steps."""
        return self.state.last_bad_step - self.state.bad_streak + 1

    def may_save(self, step: int) -> bool:
        """The last ``healthy_steps`` steps up to ``step`` were all good."""
        last_bad = self.state.last_bad_step
        return self.healthy_steps == 0 or last_bad < 0 or step - last_bad >= self.healthy_steps

    def forgive(self) -> None:
        """A relaunch or rollback starts a fresh streak (the user or the rollback acted)."""
        self.state.bad_streak = 0
