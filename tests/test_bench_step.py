"""`lotus-train bench step`: one row per optimizer, refreshes counted, ratios from the totals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.bench.step import main


def test_bench_step_reports_every_optimizer_with_refreshes_and_consistent_ratios(
        small_corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    corpus, tokenizer = small_corpus
    # Small batches keep it fast; gap 2 and an always-true switch (huge gamma, checked
    # every 2 steps) make galore and lotus refresh inside the 4 timed steps.
    overrides = [f"data.path={corpus}", f"data.tokenizer={tokenizer}",
                 "training.batch_size=4", "training.micro_batch_size=2",
                 "training.seq_len=32", "optim.update_proj_gap=2", "optim.verify_gap=2",
                 "optim.gamma=1.0e9"]
    main(["--sizes", "tiny", "--steps", "4", "--warmup-steps", "1", "--block", "2",
          "--repeats", "2", "--device", "cpu", *(arg for o in overrides for arg in ("--set", o))])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])

    assert report["bench"] == "step"
    rows = {row["optimizer"]: row for row in report["rows"]}
    assert set(rows) == {"adamw", "galore", "lotus"}
    for row in rows.values():
        assert row["size"] == "tiny" and row["steps"] == 8  # 2 repeats of 4 steps
        assert row["median_ms"] > 0 and row["mean_ms"] > 0 and row["total_s"] > 0
        assert 0 < row["optimizer_mean_ms"] < row["mean_ms"]
        assert row["spike"] >= 1.0
        assert row["peak_bytes"] > 0
    assert rows["adamw"]["refreshes"] == 0
    for name in ("galore", "lotus"):
        assert rows[name]["refresh_steps"] >= 1
        assert rows[name]["refreshes"] >= rows[name]["matrices"]
    ratios = report["ratios"]["tiny"]
    for a, b in (("lotus", "adamw"), ("galore", "adamw"), ("lotus", "galore")):
        assert ratios[f"{a}/{b}"] == pytest.approx(rows[a]["total_s"] / rows[b]["total_s"])
        assert len(ratios[f"{a}/{b}_repeats"]) == 2
        assert ratios[f"{a}/{b}_optimizer"] == pytest.approx(
            rows[a]["optimizer_mean_ms"] / rows[b]["optimizer_mean_ms"])
    assert set(report["targets"]["tiny"]) == {"lotus_total_le_1.05x_adamw",
                                              "lotus_total_le_galore"}


def test_bench_step_times_the_projected_backward_against_lotus(
        small_corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    corpus, tokenizer = small_corpus
    overrides = [f"data.path={corpus}", f"data.tokenizer={tokenizer}",
                 "training.batch_size=4", "training.micro_batch_size=2", "training.seq_len=32"]
    main(["--sizes", "tiny", "--optimizers", "lotus,lotus_pb", "--steps", "2",
          "--warmup-steps", "1", "--block", "1", "--repeats", "1", "--device", "cpu",
          *(arg for o in overrides for arg in ("--set", o))])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {row["optimizer"]: row for row in report["rows"]}
    assert set(rows) == {"lotus", "lotus_pb"}
    ratios = report["ratios"]["tiny"]
    assert ratios["lotus_pb/lotus"] == pytest.approx(
        rows["lotus_pb"]["total_s"] / rows["lotus"]["total_s"])
