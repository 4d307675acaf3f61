"""`lotus-train bench activations` runs end to end and its rows hold what they claim."""

from __future__ import annotations

import json

from launcher.bench import run_benchmark


def test_bench_activations_measures_the_rso_saving_and_the_state(capsys):
    run_benchmark("activations", ["--sizes", "60m", "--seq-lens", "16,32",
                                  "--checkpointing", "off,on"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["bench"] == "activations" and len(result["rows"]) == 4
    for row in result["rows"]:
        if row["checkpointing"]:  # only the block's input is kept, whatever the linears
            kept = row["seq_len"] * 512 * 4  # 60m: dim 512, fp32
            assert row["rso_bytes"] == row["adamw_galore_lotus_bytes"] == kept
        else:
            assert row["formula_holds"] and row["saving_bytes"] > 0
    short, long = sorted((r for r in result["rows"] if not r["checkpointing"]),
                         key=lambda r: r["seq_len"])
    assert long["rso_bytes"] == 2 * short["rso_bytes"]  # linear in tokens (no s^2 term kept)
    state = result["optimizer_state"]["60m"]
    assert state["rso"] < state["adamw"] and state["galore"] < state["adamw"]
    assert any("formula" in line for line in out)
