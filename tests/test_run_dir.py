"""A used run directory: a relaunch resumes only the same run (and names the settings it
changed), a fresh start refuses to mix with an old run, and a mistyped tokenizer path is
an error instead of a new tokenizer trained at the typo."""

from __future__ import annotations

from pathlib import Path

import pytest
from small_runs import small_run, train_rows

from launcher.config import ConfigError, load_config
from launcher.train import main, run

SHORT = ("training.steps=4", "training.warmup_steps=1", "checkpoint.interval=2",
         "eval.batches=1", "training.log_interval=1")


def launch(small_corpus, run_dir: Path, *extra: str) -> dict:
    return run(load_config("configs/tiny.yaml", small_run(*small_corpus, run_dir, *SHORT,
                                                          *extra)))


def test_a_relaunch_that_changes_the_run_is_refused_naming_the_keys(small_corpus, tmp_path):
    launch(small_corpus, tmp_path)
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim\.rank: 8 -> 4.*training\.seed: 0 -> 1"):
        launch(small_corpus, tmp_path, "training.steps=6", "optim.rank=4", "training.seed=1")
    assert (tmp_path / "config.yaml").read_text() == saved  # nothing of the refused launch


def test_a_relaunch_may_change_the_schedule_and_says_so(small_corpus, tmp_path, capsys):
    launch(small_corpus, tmp_path)
    capsys.readouterr()
    launch(small_corpus, tmp_path, "training.steps=6", "optim.lr=0.005")
    out = capsys.readouterr().out
    assert "resumed from" in out or "resuming" in out
    assert "resuming with changed settings: optim.lr 0.01 -> 0.005, training.steps 4 -> 6" in out
    assert [step for step, _ in train_rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_start_refuses_a_directory_that_holds_a_run(small_corpus, tmp_path):
    launch(small_corpus, tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint step-4, "
                                          r"metrics\.jsonl\).*checkpoint\.resume=never"):
        launch(small_corpus, tmp_path, "checkpoint.resume=never")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-2", "step-4"]
    assert len(train_rows(tmp_path)) == 4


def test_a_mistyped_tokenizer_is_an_error_not_a_new_tokenizer(tmp_path):
    typo = tmp_path / "tokenizr.json"
    with pytest.raises(SystemExit, match=r"lotus-train: error: .*tokenizr\.json"):
        main("configs/tiny.yaml", [f"data.tokenizer={typo}", f"run.dir={tmp_path / 'run'}"])
    assert not typo.exists()
