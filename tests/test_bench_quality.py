"""`lotus-train bench quality`: one run per method with its own preset, a table and a JSON line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from launcher.bench.quality import main


def test_bench_quality_runs_each_method_with_its_preset(
        small_corpus: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    corpus, tokenizer = small_corpus
    overrides = [f"data.path={corpus}", f"data.tokenizer={tokenizer}",
                 "model.max_seq_len=32", "training.seq_len=32", "training.batch_size=4",
                 "training.micro_batch_size=4"]
    argv = ["--steps", "4", "--methods", "galore,lotus", "--eval-batches", "1",
            "--out", str(tmp_path / "runs"), *(arg for o in overrides for arg in ("--set", o))]
    main(argv)
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])

    assert report["bench"] == "quality" and report["steps"] == 4
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"galore", "lotus"}
    galore, lotus = rows["galore"], rows["lotus"]
    # each method ran with its own preset from configs/tiny.yaml
    assert (galore["lr"], galore["scale"], galore["projection"], galore["switch"],
            galore["update_proj_gap"]) == (0.01, 0.25, "svd", "fixed", 200)
    assert (lotus["lr"], lotus["scale"], lotus["projection"], lotus["switch"]) == (
        0.01, 0.3, "rsvd", "displacement")
    for row in rows.values():
        assert row["steps"] == 4 and row["size"] == "tiny"
        assert math.isfinite(row["final_eval_loss"])
        assert row["final_eval_loss"] < row["initial_eval_loss"]
        assert row["refreshes"] >= row["matrices"] == 28  # 4 layers x 7 projected weights
        assert 0 < row["train_s"] <= row["total_s"]
        run_dir = tmp_path / "runs" / f"tiny-{row['method']}-seed0"
        assert (run_dir / "summary.json").is_file() and (run_dir / "train.log").is_file()
    assert set(report["targets"]) == {"tiny"}
    assert report["targets"]["tiny"]["lotus_eval_loss_le_galore"] == (
        lotus["final_eval_loss"] <= galore["final_eval_loss"])
    assert "| tiny | galore | 0 | 0.01 | 0.25 | r32 svd, every 200 |" in out

    with pytest.raises(SystemExit, match="exists"):  # never trains over an earlier run
        main(argv)
