"""`lotus-train bench data`: stream and store delivery rows per W, prepare with 1 and 2
workers (byte-identical stores), targets and a JSON line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher.cli import main


def test_bench_data_reports_delivery_prepare_and_targets(
        small_corpus: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    corpus, tokenizer = small_corpus
    main(["bench", "data", "--data", str(corpus), "--tokenizer", str(tokenizer),
          "--copies", "1", "--tile", "2", "--worlds", "1,2", "--seq-len", "31",
          "--local-batch", "4", "--global-batch", "8", "--seconds", "0.05",
          "--repeats", "1", "--delivery-repeats", "2"])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["bench"] == "data" and report["prepare_identical"] is True
    assert set(report["prepare"]) == {"1", "2"} and report["prepare_speedup"] > 0
    # 2 busy processes against 1: about min(2, cores) on an idle machine, noisy under load
    assert 0 < report["parallel_capacity"] <= 2 * (os.cpu_count() or 1)
    rows = {(r["source"], r["scheme"], r["world_size"]): r for r in report["delivery"]}
    assert set(rows) == {(s, b, w) for s in ("stream", "store") for b in ("local", "global")
                         for w in (1, 2)}
    assert rows[("store", "local", 2)]["global_batch"] == 8
    assert rows[("store", "global", 2)]["rows_per_rank"] == 4
    for row in rows.values():
        assert row["tok_per_s_rank"] > 0 and len(row["runs_tok_per_s_rank"]) == 2
        assert row["tok_per_cpu_s_rank"] > 0
    assert rows[("stream", "local", 1)]["vs_w1"] == 1.0
    assert set(report["targets"]) == {"store_flat_in_w", "store_flat_in_w_cpu",
                                      "store_min_10m_per_rank", "prepare_2_workers_1_7x",
                                      "prepare_2_workers_1_7x_projected"}
    one = report["prepare"]["1"]
    assert one["worker_cpu_s"] > 0 and one["main_cpu_s"] > 0 and one["tok_per_worker_cpu_s"] > 0
    assert report["prepare_speedup_projected"] > 0
    assert "tok/s per rank" in out and "prepare 2 workers / 1" in out
