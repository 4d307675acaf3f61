"""training.compile: per-block torch.compile trains the same run as eager, and compiled
and eager runs resume from each other's checkpoints (same state-dict keys)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch._inductor.config as inductor_config
from small_runs import small_run, train_rows
from torch._dynamo.utils import counters
from torch.distributed.checkpoint import FileSystemReader

from launcher.compile import maybe_compile, require_cpp_compiler
from launcher.config import ConfigError, load_config
from launcher.train import run
from lotus_dist.model import MODEL_SIZES, build_model


def _has_cpp_compiler() -> bool:
    try:
        require_cpp_compiler()
    except ConfigError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _has_cpp_compiler(),
                                    reason="torch.compile on the CPU needs a C++ compiler "
                                           "(inductor: $CXX, else g++)")
TINY = dataclasses.replace(MODEL_SIZES["tiny"], vocab_size=512)


def overrides(corpus: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    """20 steps of the tiny model, a checkpoint at 10 and 20, eval only at the end."""
    return small_run(corpus, tokenizer, run_dir, "training.steps=20",
                     "training.warmup_steps=2", "training.log_interval=1", "eval.interval=0",
                     "eval.batches=1", "checkpoint.interval=10", "checkpoint.keep_latest=0",
                     *extra)


def checkpoint_keys(run_dir: Path, step: int) -> set[str]:
    reader = FileSystemReader(run_dir / "ckpt" / f"step-{step}")
    return set(reader.read_metadata().state_dict_metadata)


def assert_same_losses(got: Path, want: Path) -> None:
    got_rows, want_rows = train_rows(got), train_rows(want)
    assert [step for step, _ in got_rows] == [step for step, _ in want_rows] == list(
        range(1, 21))
    for (step, a), (_, b) in zip(got_rows, want_rows, strict=True):
        assert a == pytest.approx(b, abs=1e-4), f"step {step}"


@pytest.mark.slow
@needs_compiler
def test_compiled_run_matches_eager_and_checkpoints_are_interchangeable(small_corpus, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    counters.clear()
    run(load_config("configs/tiny.yaml", overrides(*small_corpus, eager)))
    assert not counters["stats"]["unique_graphs"]
    run(load_config("configs/tiny.yaml", overrides(*small_corpus, compiled,
                                                   "training.compile=true")))
    assert counters["stats"]["unique_graphs"]  # dynamo did compile the blocks
    assert_same_losses(compiled, eager)

    keys = checkpoint_keys(compiled, 10)
    assert keys == checkpoint_keys(eager, 10)
    assert not [key for key in keys if "_orig_mod" in key]

    # The compiled run's step-10 checkpoint goes on eagerly as the eager run did.
    shutil.rmtree(compiled / "ckpt" / "step-20")
    run(load_config("configs/tiny.yaml", overrides(*small_corpus, compiled,
                                                   "training.compile=false")))
    assert_same_losses(compiled, eager)


def test_compile_without_a_cpp_compiler_fails_at_start_up(monkeypatch):
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-compiler++"))
    with pytest.raises(ConfigError, match=r"training\.compile=true .* C\+\+ compiler"):
        maybe_compile(build_model(TINY), load_config(None, ["training.compile=true"]))
