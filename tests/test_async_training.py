"""checkpoint.async=true through the trainer: ranks agree when every background write is
done before any rank publishes, and the checkpoints resume like synchronous ones."""

from __future__ import annotations

import shutil

from small_runs import metric_rows, small_run
from test_preemption import launch

from launcher.config import load_config
from launcher.train import run


def overrides(corpus, tokenizer, run_dir, *extra: str) -> list[str]:
    return small_run(corpus, tokenizer, run_dir, "training.steps=16", "training.warmup_steps=2",
                     "training.log_interval=1", "eval.interval=8", "eval.batches=1",
                     "checkpoint.interval=4", "checkpoint.keep_latest=0", *extra)


def test_async_checkpoints_resume_like_synchronous_ones(small_corpus, tmp_path):
    sync, background = tmp_path / "sync", tmp_path / "async"
    run(load_config("configs/tiny.yaml", overrides(*small_corpus, sync)))
    args = overrides(*small_corpus, background, "checkpoint.async=true")
    run(load_config("configs/tiny.yaml", args))
    names = sorted(p.name for p in (background / "ckpt").iterdir())
    assert names == sorted(p.name for p in (sync / "ckpt").iterdir())
    assert metric_rows(background) == metric_rows(sync)
    for step in (16, 12):
        shutil.rmtree(background / "ckpt" / f"step-{step}")
    run(load_config("configs/tiny.yaml", args))  # resumes from the async step-8
    assert metric_rows(background) == metric_rows(sync)


def test_async_checkpoints_on_two_ranks_are_published_by_all(small_corpus, tmp_path):
    proc = launch(2, overrides(*small_corpus, tmp_path, "checkpoint.async=true"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-12", "step-16", "step-4", "step-8"], out
    assert out.count("saved checkpoint") == 4
