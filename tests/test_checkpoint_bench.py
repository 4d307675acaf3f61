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
