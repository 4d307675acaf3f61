"""`lotus-train bench quality`: the same short run for every method, each with its own preset.

For each size and method the real trainer (``launcher.train.run``) trains from the same
config file (``configs/tiny.yaml`` by default, on the embedded sample corpus) with
``--set optim.name=<method>``, so each method runs with its preset (``methods.<name>``:
the built-in one, then the file's) and every run has the same steps, data, batch and
schedule shape (warmup 10 % of the steps). Reported per run: the final eval loss and
perplexity, subspace refreshes (per projected matrix, from summary.json), and wall time
(training only, and the whole run with its evaluations). Sizes other than the file's own
project at rank dim/4, the rule every configs/*.yaml follows, unless ``--set
optim.rank=...`` says otherwise.

Each run has its own run directory under ``--out`` (a temporary folder, deleted at the
end, when not given); the trainer's log goes to ``train.log`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from launcher.config import LOW_RANK_METHODS, METHODS, PROJECTED_OPTIMIZERS, Config, load_config
from lotus_dist.model import MODEL_SIZES

DEFAULT_METHODS = ("adamw", "galore", "lotus", "grasswalk", "grassjump", "rso")


def run_overrides(size: str, method: str, steps: int, seed: int, run_dir: Path,
                  base: Config, overrides: list[str], eval_batches: int | None) -> list[str]:
    """The ``--set`` list of one run: the user's overrides, then the bench's own keys."""
    sets = [*overrides, f"optim.name={method}", f"model.size={size}",
            f"training.steps={steps}", f"training.warmup_steps={steps // 10}",
            f"training.seed={seed}", f"training.log_interval={max(steps // 10, 1)}",
            "eval.interval=0", "checkpoint.interval=0", "checkpoint.resume=never",
            "run.tensorboard=false", f"run.dir={run_dir}"]
    if eval_batches is not None:
        sets.append(f"eval.batches={eval_batches}")
    user_rank = any(o.partition("=")[0].strip() == "optim.rank" for o in overrides)
    if size != base.model.size and method in LOW_RANK_METHODS and not user_rank:
        sets.append(f"optim.rank={MODEL_SIZES[size].dim // 4}")
    return sets


def run_one(config: str | None, sets: list[str], run_dir: Path) -> dict[str, Any]:
    """Train one run in this process; return its row (config values and results)."""
    from launcher.train import run

    cfg = load_config(config, sets)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
        summary = run(cfg)
    total_s = time.perf_counter() - start
    o = cfg.optim
    refreshes = list(summary["refreshes_per_matrix"].values())
    return {
        "method": o.name, "size": cfg.model.size, "seed": cfg.training.seed,
        "steps": summary["steps"], "lr": o.lr,
        "scale": o.scale if o.name in PROJECTED_OPTIMIZERS else None,
        "rank": o.rank if o.name != "adamw" else None,
        "projection": o.projection if o.name in PROJECTED_OPTIMIZERS else None,
        "switch": o.switch if o.name in PROJECTED_OPTIMIZERS else None,
        "update_proj_gap": o.update_proj_gap if o.name != "adamw" else None,
        "min_lr_ratio": cfg.training.min_lr_ratio,
        "final_eval_loss": summary["final_eval_loss"],
        "final_eval_ppl": summary["final_eval_ppl"],
        "initial_eval_loss": summary["initial_eval_loss"],
        "refreshes": sum(refreshes), "matrices": len(refreshes),
        "refreshes_per_matrix_mean": statistics.fmean(refreshes) if refreshes else 0.0,
        "refreshes_per_matrix_min": min(refreshes, default=0),
        "refreshes_per_matrix_max": max(refreshes, default=0),
        "train_s": summary["wall_time_s"], "total_s": total_s,
    }


def targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """Per size: lotus's final eval loss (mean over seeds) no worse than galore's."""
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        loss = {m: statistics.fmean(r["final_eval_loss"] for r in rows
                                    if r["size"] == size and r["method"] == m)
                for m in ("lotus", "galore")
                if any(r["size"] == size and r["method"] == m for r in rows)}
        if len(loss) == 2:
            out[size] = {"lotus_eval_loss_le_galore": loss["lotus"] <= loss["galore"]}
    return out


def _settings(row: dict[str, Any]) -> str:
    if row["method"] == "adamw":
        return "full rank"
    if row["method"] == "rso":
        return f"r{row['rank']} random P, W frozen, merged every {row['update_proj_gap']}"
    every = (f"every {row['update_proj_gap']}" if row["switch"] == "fixed"
             else row["switch"])
    return f"r{row['rank']} {row['projection']}, {every}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| size | method | seed | lr | scale | subspace | min lr ratio | final eval loss | "
          "eval ppl | refreshes per matrix (min-max) | train s | total s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        scale = "-" if r["scale"] is None else f"{r['scale']:g}"
        refreshes = ("-" if not r["matrices"] else
                     f"{r['refreshes_per_matrix_mean']:.1f} ({r['refreshes_per_matrix_min']}-"
                     f"{r['refreshes_per_matrix_max']})")
        print(f"| {r['size']} | {r['method']} | {r['seed']} | {r['lr']:g} | {scale} | "
              f"{_settings(r)} | {r['min_lr_ratio']:g} | {r['final_eval_loss']:.4f} | "
              f"{r['final_eval_ppl']:.2f} | {refreshes} | {r['train_s']:.1f} | "
              f"{r['total_s']:.1f} |")


def _split(text: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if bad or not items:
        sys.exit(f"bench quality: unknown {what} {', '.join(bad) or '(none given)'}; known: "
                 f"{', '.join(known)}")
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML every run uses")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override a config key in every run (repeatable; beats presets)")
    parser.add_argument("--sizes", default="tiny", help="comma-separated model sizes "
                                                        "(e.g. tiny,20m)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated optim.name values")
    parser.add_argument("--steps", type=int, default=300,
                        help="optimizer steps per run (default: all six methods on tiny "
                             "in about 12 minutes on 2 CPU cores)")
    parser.add_argument("--seeds", default="0", help="comma-separated training.seed values")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="eval.batches of the final evaluation (default: the config's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (default: torch's, %(default)s)")
    parser.add_argument("--out", default=None,
                        help="folder for the run directories (kept); default: a temporary "
                             "folder, deleted at the end")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.threads < 1:
        parser.error("--steps must be >= 2 and --threads >= 1")
    torch.set_num_threads(args.threads)
    sizes = _split(args.sizes, list(MODEL_SIZES), "size")
    methods = _split(args.methods, METHODS, "method")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    base = load_config(args.config, args.overrides)

    print(f"bench quality: {args.threads} threads, config {args.config} "
          f"{' '.join(args.overrides)}".rstrip())
    print(f"  {args.steps} steps per run (warmup {args.steps // 10}), global batch "
          f"{base.training.batch_size} x seq {base.training.seq_len}, eval only at the end; "
          f"sizes {', '.join(sizes)}; methods {', '.join(methods)}; seeds "
          f"{', '.join(map(str, seeds))}", flush=True)
    rows, load_start = [], os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if args.out is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-quality-")))
        else:
            out = Path(args.out)
        for size in sizes:
            for seed in seeds:
                for method in methods:
                    run_dir = out / f"{size}-{method}-seed{seed}"
                    if run_dir.exists():
                        sys.exit(f"bench quality: {run_dir} exists; give an empty or new --out")
                    sets = run_overrides(size, method, args.steps, seed, run_dir, base,
                                         args.overrides, args.eval_batches)
                    row = run_one(args.config, sets, run_dir)
                    rows.append(row)
                    print(f"  {size} {method} seed {seed}: eval loss "
                          f"{row['final_eval_loss']:.4f}, {row['refreshes']} refreshes, "
                          f"{row['total_s']:.1f} s", flush=True)
    load = (load_start, os.getloadavg()[0])
    print_table(rows)
    print(f"\n1-minute load average {load[0]:.2f} at the start, {load[1]:.2f} at the end "
          f"({os.cpu_count()} CPUs): wall times compare only on an otherwise idle machine")
    found = targets(rows)
    for size, result in found.items():
        met = "met" if result["lotus_eval_loss_le_galore"] else "NOT met"
        print(f"\ntarget {size}: lotus final eval loss <= galore's: {met}")
    print(json.dumps({"bench": "quality", "threads": args.threads, "config": args.config,
                      "overrides": args.overrides,
                      "steps": args.steps, "seeds": seeds, "sizes": sizes, "methods": methods,
                      "batch_size": base.training.batch_size,
                      "seq_len": base.training.seq_len, "load_average": load,
                      "rows": rows, "targets": found}))
