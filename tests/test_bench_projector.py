"""`lotus-train bench projector` reports the subspace error next to the energy."""

import json

import pytest

from launcher.bench.projector import main


@pytest.mark.slow  # spawns two measurement processes
def test_projector_bench_reports_subspace_error(capsys):
    main(["--shapes", "96x160:8", "--decays", "1.0", "--gap", "0.1", "--repeats", "1",
          "--device", "cpu"])
    out = capsys.readouterr().out
    assert "subspace" in out.splitlines()[0]
    (row,) = json.loads(out.strip().splitlines()[-1])["rows"]
    assert row["gap"] == 0.1 and row["energy_ratio"] > 0.999
    assert 0 <= row["subspace_error"] <= 1e-2
