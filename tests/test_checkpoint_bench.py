"""`lotus-train bench checkpoint` runs end to end (tiny settings) and prints its JSON line."""

from __future__ import annotations

import json

from launcher.bench import run_benchmark


def test_bench_checkpoint_prints_a_table_and_a_json_line(capsys, tmp_path):
    run_benchmark("checkpoint", ["--size", "tiny", "--vocab-size", "256", "--batch", "1",
                                 "--seq-len", "8", "--steps", "8", "--every", "4",
                                 "--repeats", "2",
                                 "--warmup", "0", "--dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["bench"] == "checkpoint"
    assert [row["mode"] for row in result["modes"]] == ["sync", "async"]
    assert all(row["saves"] == 4 for row in result["modes"])
    assert result["checksums"]["s_per_gb"] > 0
    assert any("save/plain" in line for line in out)
    assert sorted(p.name for p in (tmp_path / "sync").iterdir())[-1].startswith("step-")


def test_a_background_write_that_outlasts_every_window_is_measured_against_the_other_mode():
    """A slow disk can keep an async write in flight for a whole window, every window:
    that save is then measured against the plain steps of the sync mode, not refused."""
    from launcher.bench.checkpoint import Window, _mode_row

    sync = [Window(kinds=["save", "plain", "plain", "plain"], seconds=[0.5, 0.1, 0.1, 0.1])]
    busy = [Window(kinds=["save", "in_flight", "in_flight", "publish"],
                   seconds=[0.2, 0.3, 0.3, 0.2])]
    assert _mode_row("sync", sync, 0.1)["own_plain_steps"]
    row = _mode_row("async", busy, 0.1)
    assert not row["own_plain_steps"]
    assert abs(row["plain_ms"] - 100.0) < 1e-9
    assert abs(row["cost_per_save_ms"] - 600.0) < 1e-9
    assert abs(row["save_over_plain"] - 2.0) < 1e-9
