"""training.clip_on=auto resolves to one definition on every engine and world size."""

from __future__ import annotations

import pytest

from launcher.config import PROJECTED_OPTIMIZERS, clips_consumed, load_config


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("lowrank_comm", ["true", "false"])
@pytest.mark.parametrize("name", [*PROJECTED_OPTIMIZERS, "adamw"])
def test_auto_clips_the_same_norm_on_ddp_and_fsdp(engine, lowrank_comm, name):
    """Low-rank methods clip on the consumed norm (low-rank DDP has no other), whether
    one process, plain DDP or FSDP runs them: scaling out must not change the step."""
    cfg = load_config("configs/tiny.yaml", [f"parallel.engine={engine}", f"optim.name={name}",
                                            f"parallel.lowrank_comm={lowrank_comm}"])
    assert clips_consumed(cfg) == (name in PROJECTED_OPTIMIZERS)


def test_deepspeed_clips_the_gradient_and_explicit_settings_win():
    ds = load_config("configs/tiny.yaml", ["parallel.engine=deepspeed"])
    assert not clips_consumed(ds)  # DeepSpeed clips the full gradient inside its step
    explicit = load_config("configs/tiny.yaml", ["training.clip_on=gradient"])
    assert not clips_consumed(explicit)
