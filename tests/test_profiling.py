"""training.profile_steps: a torch.profiler trace of steps N..M under run_dir/profile."""

from __future__ import annotations

import json

import pytest
from small_runs import small_run

from launcher.config import ConfigError, load_config
from launcher.train import run


@pytest.mark.parametrize("value", ["3,2", "-1,2", "0,1", "2", "a,b", "[1, 2, 3]", "1,500"])
def test_bad_windows_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"training\.profile_steps"):
        load_config("configs/tiny.yaml", [f"training.profile_steps={value}",
                                          "training.steps=400"])


@pytest.mark.parametrize("value", ["2,3", "[2, 3]", "4,4"])
def test_good_windows_load(value):
    load_config("configs/tiny.yaml", [f"training.profile_steps={value}"])


def test_a_run_traces_exactly_the_window(small_corpus, tmp_path):
    run(load_config("configs/tiny.yaml", small_run(
        *small_corpus, tmp_path, "training.steps=5", "training.warmup_steps=1",
        "eval.interval=0", "eval.batches=1", "checkpoint.interval=0",
        "training.profile_steps=2,3")))
    (trace,) = (tmp_path / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")]
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the steps' ops are in it
