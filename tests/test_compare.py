"""`lotus-train compare`: a table of several runs from their own files, and a PNG of
their eval-loss curves by step and by wall time."""

from __future__ import annotations

import json

import pytest
from small_runs import small_run

from launcher.cli import main
from launcher.config import load_config
from launcher.train import run

SHORT = ("training.steps=4", "training.warmup_steps=1", "eval.interval=2", "eval.batches=1",
         "checkpoint.interval=0")


def test_compare_tabulates_runs_and_plots_their_curves(small_corpus, tmp_path, capsys):
    for name in ("adamw", "lotus"):
        run(load_config("configs/tiny.yaml", small_run(*small_corpus, tmp_path / name, *SHORT,
                                                       f"optim.name={name}")))
    lotus = json.loads((tmp_path / "lotus" / "summary.json").read_text())
    adamw = json.loads((tmp_path / "adamw" / "summary.json").read_text())
    assert (lotus["optimizer"], lotus["rank"], adamw["optimizer"], adamw["rank"]) == \
        ("lotus", 8, "adamw", None)
    # Adam keeps two moments per weight; the low-rank method keeps them for R only
    assert 0 < lotus["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    capsys.readouterr()
    png = tmp_path / "curves.png"
    main(["compare", str(tmp_path / "adamw"), str(tmp_path / "lotus"), "--out", str(png)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "optimizer", "rank"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["lotus"][1:3] == ["lotus", "8"] and rows["adamw"][1:3] == ["adamw", "-"]
    assert f"{lotus['final_eval_ppl']:,.2f}" in rows["lotus"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_names_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match=r"lotus-train: error: .* is not a run directory"):
        main(["compare", str(tmp_path), "--out", ""])
