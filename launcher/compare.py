"""`lotus-train compare`: one table of several runs and their eval-loss curves.

Reads what every run directory holds (summary.json, config.yaml, metrics.jsonl), so it
works on finished runs, on runs still going (their last eval so far) and across engines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("run", "optimizer", "rank", "steps", "eval ppl", "tok/s", "opt state MB",
           "refreshes", "wall s")


class CompareError(ValueError):
    """A directory is not a run directory (no metrics.jsonl)."""


def load_run(run_dir: Path) -> dict[str, Any]:
    """The row and the eval curve of one run directory."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    start = rows[0]["time"] if rows else 0.0
    summary_path, config_path = run_dir / "summary.json", run_dir / "config.yaml"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    optim = config.get("optim", {})
    name = summary.get("optimizer", optim.get("name", "?"))
    ppl = summary.get("final_eval_ppl") or (evals[-1]["eval_ppl"] if evals else None)
    state = summary.get("optimizer_state_bytes")
    return {
        "run": run_dir.name or str(run_dir),
        "optimizer": name,
        "rank": summary.get("rank", optim.get("rank") if name != "adamw" else None),
        "steps": summary.get("steps", max((r["step"] for r in rows), default=0)),
        "eval ppl": ppl,
        "tok/s": summary.get("tokens_per_s"),
        "opt state MB": None if state is None else state / 2**20,
        "refreshes": sum(summary.get("refreshes_per_matrix", {}).values()) or None,
        "wall s": summary.get("wall_time_s"),
        "curve": [(r["step"], r["time"] - start, r["eval_loss"]) for r in evals],
    }


def table(runs: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 1e5 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(run[c]) for c in COLUMNS] for run in runs]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    """Eval loss against steps and against wall-clock time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for run in runs:
        steps, seconds, losses = zip(*run["curve"]) if run["curve"] else ((), (), ())
        label = f"{run['run']} ({run['optimizer']})"
        by_step.plot(steps, losses, marker="o", markersize=3, label=label)
        by_time.plot(seconds, losses, marker="o", markersize=3, label=label)
    by_step.set(xlabel="step", ylabel="eval loss", title="eval loss by step")
    by_time.set(xlabel="wall-clock s", ylabel="eval loss", title="eval loss by time")
    by_step.legend(fontsize="small")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def compare_command(run_dirs: list[str], out: str | None) -> None:
    runs = [load_run(Path(d)) for d in run_dirs]
    print(table(runs))
    if out:
        try:
            plot(runs, Path(out))
        except ImportError:
            print("(no plot: pip install -c constraints.txt -e '.[plot]' for matplotlib)")
            return
        print(f"wrote {out}")
