"""A diverging run never publishes or prunes for a damaged checkpoint, and recovers.

The probe that found the bugs: a run resumed with ``optim.lr=1e6`` broke its weights,
checkpointed during the skipped steps and pruned the good checkpoints, and the advice it
printed (lower the lr, resume) did not work because the lr came back from the checkpoint.
"""

from __future__ import annotations

import math

import pytest
from small_runs import metric_rows, small_run, train_rows

from launcher.config import load_config
from launcher.health import SPIKE_WARMUP, DivergenceGuard
from launcher.train import main, run


def overrides(corpus, tokenizer, run_dir, *extra: str) -> list[str]:
    return small_run(corpus, tokenizer, run_dir, "training.warmup_steps=2",
                     "training.log_interval=1", "eval.interval=0", "eval.batches=1",
                     "checkpoint.interval=2", "checkpoint.keep_latest=1", *extra)


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "ckpt").iterdir())


def diverge(small_corpus, run_dir, *extra: str) -> str:
    """10 good steps, then a relaunch with a learning rate that breaks the weights."""
    run(load_config("configs/tiny.yaml", overrides(*small_corpus, run_dir, "training.steps=10")))
    with pytest.raises(SystemExit) as exc:
        main("configs/tiny.yaml", overrides(*small_corpus, run_dir, "training.steps=40",
                                            "optim.lr=1e6", *extra))
    return str(exc.value)


def test_a_diverging_run_keeps_its_good_checkpoint(small_corpus, tmp_path, capsys):
    message = diverge(small_corpus, tmp_path)
    assert "optim.lr 0.01 -> 1000000.0" in capsys.readouterr().out  # the override applied
    assert "the run diverged" in message and "training.max_skipped_steps=10" in message
    # Nothing was published after the weights broke; the last good one was not pruned.
    good = [name for name in checkpoints(tmp_path) if not name.endswith(".diverged")]
    assert good and all(int(name.split("-")[1]) <= 12 for name in good), checkpoints(tmp_path)
    assert f"resumes from {tmp_path / 'ckpt' / good[-1]}" in message


def test_a_lower_lr_applies_on_resume_after_a_divergence(small_corpus, tmp_path, capsys):
    diverge(small_corpus, tmp_path)
    capsys.readouterr()
    summary = run(load_config("configs/tiny.yaml", overrides(
        *small_corpus, tmp_path, "training.steps=20", "optim.lr=0.005")))
    out = capsys.readouterr().out
    assert "optim.lr 0.01 -> 0.005" in out
    assert summary["steps"] == 20
    rows = metric_rows(tmp_path)
    last = [r for r in rows if "lr" in r][-1]
    assert last["lr"] == pytest.approx(0.005 * 0.1)  # the new peak x min_lr_ratio
    steps = [step for step, _ in train_rows(tmp_path)]
    assert steps == list(range(1, 21))  # every step once: the bad stretch was dropped
    assert all(math.isfinite(loss) and loss < 7 for _, loss in train_rows(tmp_path))


def test_rollback_reloads_the_last_good_checkpoint_with_a_lower_lr(small_corpus, tmp_path,
                                                                   capsys):
    run(load_config("configs/tiny.yaml", overrides(*small_corpus, tmp_path, "training.steps=10")))
    summary = run(load_config("configs/tiny.yaml", overrides(
        *small_corpus, tmp_path, "training.steps=24", "optim.lr=1e6",
        "training.on_divergence=rollback", "training.rollback_lr_factor=1e-8")))
    out = capsys.readouterr().out
    assert "rolled back to step" in out and "learning rate x1e-08" in out
    assert summary["steps"] == 24
    assert [step for step, _ in train_rows(tmp_path)] == list(range(1, 25))
    assert math.isfinite(summary["final_eval_loss"])


def test_nonfinite_raise_stops_at_the_first_bad_step(small_corpus, tmp_path):
    message = diverge(small_corpus, tmp_path, "optim.nonfinite=raise")
    assert "optim.nonfinite=raise" in message
    assert "the run diverged" not in message  # it stopped at once, not after 10 skips


def test_the_guard_calls_a_spike_only_after_a_warm_up_and_above_the_factor():
    guard = DivergenceGuard(max_bad_streak=2, spike_factor=2.0, healthy_steps=3)
    assert not guard.record(1, 50.0, skipped=False)  # no running mean yet: not a spike
    for step in range(2, SPIKE_WARMUP + 2):
        assert not guard.record(step, 4.0, skipped=False)
    mean = guard.state.loss_ema
    assert not guard.record(10, 1.9 * mean, skipped=False)
    assert guard.record(11, 2.1 * guard.state.loss_ema, skipped=False)
    assert guard.record(12, math.nan, skipped=False)
    assert not guard.diverged and guard.streak_start == 11
    assert guard.record(13, 4.0, skipped=True)
    assert guard.diverged


def test_the_guard_lets_a_save_through_only_after_enough_good_steps():
    guard = DivergenceGuard(max_bad_streak=5, spike_factor=0.0, healthy_steps=3)
    assert guard.may_save(1)  # a fresh run is healthy
    guard.record(5, 4.0, skipped=True)
    for step in (6, 7):
        guard.record(step, 4.0, skipped=False)
        assert not guard.may_save(step)
    guard.record(8, 4.0, skipped=False)
    assert guard.may_save(8)
