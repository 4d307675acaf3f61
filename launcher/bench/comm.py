"""`lotus-train bench comm`: gradient traffic of low-rank DDP against full DDP.

Counted from shapes (no model is built) for the paper's configs: per optimizer step each
rank all-reduces, under full DDP, every gradient; under low-rank DDP, R (r x max(m, n))
for every projected matrix and the full gradient of the rest (embeddings, head, norms),
plus the refresh sketches amortised over the refresh interval. A refresh's rSVD with q
power iterations all-reduces (q + 1) d x l sketches and (q + 1) k x l co-sketches
(l = r + p), against a full-gradient all-gather of m x n for an exact SVD.

Under FSDP (``--fsdp-world``), per optimizer step and rank: AdamW reduce-scatters every
gradient once per micro-batch; Lotus with ``optim.projected_backward`` reduce-scatters
only the non-projected gradients per micro-batch, all-reduces R once per step, and on a
refresh step (amortised over the refresh interval) reduce-scatters the projected
gradients too, plus the sketches. Collectives are counted by the bytes of the tensor they
reduce, as DDP counts its all-reduce (a ring all-reduce moves about twice what a
reduce-scatter of the same tensor does). The micro-batches per step are the config's at
that world size.

RSO (``optim.name=rso``) all-reduces, under DDP, B's gradient (out x r per targeted
linear) and the full gradient of the rest; its frozen W has none. Under FSDP it
reduce-scatters the same per micro-batch. No sketches: P is drawn, not computed.

Measured: seconds per optimizer step on 2 gloo ranks for small models, low-rank against
full DDP, and FSDP AdamW against FSDP Lotus with the projected backward (its gradient
bytes per step as the engine counts them), in the same run (torchrun subprocesses of the
real trainer, alternated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launcher.config import load_config
from lotus_dist.model import MODEL_SIZES, LlamaConfig

FP32 = 4


@dataclass(frozen=True)
class Traffic:
    """Bytes per optimizer step and rank, by kind."""

    full_ddp: int
    lowrank: int
    plain: int
    sketches_per_refresh: int
    full_gather_per_refresh: int


def projected_shapes(cfg: LlamaConfig) -> list[tuple[int, int]]:
    """(out, in) of the attention and MLP weights: what lotus_param_groups projects."""
    attn = [(cfg.dim, cfg.dim)] * 4
    mlp = [(cfg.intermediate_size, cfg.dim)] * 2 + [(cfg.dim, cfg.intermediate_size)]
    return (attn + mlp) * cfg.n_layers


def traffic(cfg: LlamaConfig, rank: int, oversample: int, power_iters: int) -> Traffic:
    shapes = projected_shapes(cfg)
    projected = sum(m * n for m, n in shapes)
    plain = cfg.num_params - projected
    width = [min(rank + oversample, min(m, n)) for m, n in shapes]
    return Traffic(
        full_ddp=FP32 * cfg.num_params,
        lowrank=FP32 * (sum(rank * max(m, n) for m, n in shapes) + plain),
        plain=FP32 * plain,
        sketches_per_refresh=FP32 * sum((power_iters + 1) * (m + n) * w
                                        for (m, n), w in zip(shapes, width)),
        full_gather_per_refresh=FP32 * projected,
    )


def fsdp_gradient_bytes(cfg: LlamaConfig, rank: int, t: Traffic, accum: int,
                        interval: int, sharded: bool = True) -> tuple[float, float]:
    """Gradient bytes per step and rank under FSDP: (AdamW, Lotus with the projected
    backward), for ``accum`` micro-batches per step and a refresh every ``interval``.
    ``sharded`` (``parallel.fsdp_grad_accumulation=sharded``, the default) reduce-scatters
    R every micro-batch; unsharded all-reduces the summed R once per step."""
    projected = t.full_ddp - t.plain
    r = FP32 * sum(rank * max(m, n) for m, n in projected_shapes(cfg))
    adamw = accum * t.full_ddp
    lotus = (accum * t.plain + (accum if sharded else 1) * r
             + (accum * projected + t.sketches_per_refresh) / interval)
    return adamw, lotus


def rso_bytes(cfg: LlamaConfig, rank: int, t: Traffic) -> int:
    """Bytes RSO's DDP all-reduces per step: every B (out x r) and the plain gradients."""
    return FP32 * sum(m * min(rank, n) for m, n in projected_shapes(cfg)) + t.plain


def _counted_rows(sizes: list[str], interval: int, fsdp_world: int) -> list[dict]:
    rows = []
    for size in sizes:
        cfg = load_config(f"configs/{size}.yaml")
        model = MODEL_SIZES[size]
        t = traffic(model, cfg.optim.rank, cfg.optim.oversample, cfg.optim.power_iters)
        accum = max(1, cfg.training.batch_size // (cfg.training.micro_batch_size * fsdp_world))
        fsdp_adamw, fsdp_lotus = fsdp_gradient_bytes(model, cfg.optim.rank, t, accum, interval)
        _, fsdp_lotus_unsharded = fsdp_gradient_bytes(model, cfg.optim.rank, t, accum,
                                                      interval, sharded=False)
        one_adamw, one_lotus = fsdp_gradient_bytes(model, cfg.optim.rank, t, 1, interval)
        lowrank_total = t.lowrank + t.sketches_per_refresh / interval
        projected_full = t.full_ddp - t.plain
        min_dim = min(model.dim, model.intermediate_size)
        rso = rso_bytes(model, load_config(f"configs/{size}.yaml", ["optim.name=rso"]).optim.rank,
                        t)
        rows.append({
            "rso_ddp_mb": rso / 2**20, "rso_ratio": rso / t.full_ddp,
            "fsdp_rso_ratio": accum * rso / fsdp_adamw,
            "size": size, "rank": cfg.optim.rank, "full_ddp_mb": t.full_ddp / 2**20,
            "lowrank_ddp_mb": lowrank_total / 2**20,
            "ratio": lowrank_total / t.full_ddp,
            "projected_ratio": (t.lowrank - t.plain) / projected_full,
            "projected_bound": cfg.optim.rank / min_dim,
            "sketch_mb_per_refresh": t.sketches_per_refresh / 2**20,
            "full_gather_mb_per_refresh": t.full_gather_per_refresh / 2**20,
            "fsdp_world": fsdp_world, "fsdp_micro_batches": accum,
            "fsdp_adamw_mb": fsdp_adamw / 2**20, "fsdp_lotus_pb_mb": fsdp_lotus / 2**20,
            "fsdp_pb_ratio": fsdp_lotus / fsdp_adamw,
            "fsdp_pb_unsharded_ratio": fsdp_lotus_unsharded / fsdp_adamw,
            "fsdp_pb_ratio_one_micro_batch": one_lotus / one_adamw,
        })
    return rows


def _measure(size: str, mode: list[str], steps: int, overrides: list[str], run_dir: Path) -> dict:
    sets = [f"model.size={size}", f"run.dir={run_dir}", f"training.steps={steps}",
            "training.warmup_steps=1", "eval.interval=0", "eval.batches=1",
            "checkpoint.interval=0", "run.tensorboard=false", *mode, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "launcher", "train", "--config",
                           "configs/tiny.yaml", *(f"--set={s}" for s in sets)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench comm: the {size} run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seconds_per_step": summary["wall_time_s"] / summary["steps"],
            "bytes_per_step": summary["bytes_per_step"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60m,350m,1b,7b", help="configs to count")
    parser.add_argument("--refresh-interval", type=int, default=50,
                        help="steps between refreshes for amortising sketches (50 = the "
                             "verifying gap, the most frequent a displacement switch allows)")
    parser.add_argument("--fsdp-world", type=int, default=8,
                        help="ranks whose micro-batches per step the FSDP columns assume")
    parser.add_argument("--measure", default="tiny,20m",
                        help="sizes to time on 2 gloo ranks ('' to skip)")
    parser.add_argument("--steps", type=int, default=60, help="steps per timed run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for the timed runs (repeatable)")
    args = parser.parse_args(argv)

    rows = _counted_rows(args.sizes.split(","), args.refresh_interval, args.fsdp_world)
    print(f"{'size':>5} {'rank':>5} {'full DDP MB':>12} {'low-rank MB':>12} {'ratio':>6} "
          f"{'proj ratio':>10} {'r/min(m,n)':>10} {'sketch MB/refresh':>18} "
          f"{'full gather MB':>15} {'rso MB':>9} {'rso ratio':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['rank']:>5} {r['full_ddp_mb']:12.1f} {r['lowrank_ddp_mb']:12.1f} "
              f"{r['ratio']:6.3f} {r['projected_ratio']:10.3f} {r['projected_bound']:10.3f} "
              f"{r['sketch_mb_per_refresh']:18.1f} {r['full_gather_mb_per_refresh']:15.1f} "
              f"{r['rso_ddp_mb']:9.1f} {r['rso_ratio']:9.3f}")
    print(f"\nFSDP gradient traffic per step and rank at W={args.fsdp_world} "
          "(lotus with optim.projected_backward against adamw)")
    print(f"{'size':>5} {'micro-batches':>13} {'adamw MB':>10} {'lotus pb MB':>12} {'ratio':>6} "
          f"{'unsharded accum':>15} {'ratio, 1 micro-batch':>21} {'rso ratio':>9}")
    for r in rows:
        print(f"{r['size']:>5} {r['fsdp_micro_batches']:>13} {r['fsdp_adamw_mb']:10.1f} "
              f"{r['fsdp_lotus_pb_mb']:12.1f} {r['fsdp_pb_ratio']:6.3f} "
              f"{r['fsdp_pb_unsharded_ratio']:15.3f} "
              f"{r['fsdp_pb_ratio_one_micro_batch']:21.3f} {r['fsdp_rso_ratio']:9.3f}")
    measured = []
    sizes = [s for s in args.measure.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            # alternate the order so a drift of the machine does not favour one mode
            runs = {}
            for i, kind in enumerate((False, True, "rso", False, True, "rso")):
                mode = (["optim.name=rso"] if kind == "rso" else
                        ["training.clip_on=consumed", f"parallel.lowrank_comm={str(kind).lower()}"])
                m = _measure(size, mode, args.steps, args.overrides, Path(tmp) / f"{size}-{i}")
                runs.setdefault(kind, []).append(m)
            full = min(m["seconds_per_step"] for m in runs[False])
            low = min(m["seconds_per_step"] for m in runs[True])
            row = {"size": size, "full_s_per_step": full, "lowrank_s_per_step": low,
                   "time_ratio": low / full,
                   "measured_bytes_full": runs[False][0]["bytes_per_step"],
                   "measured_bytes_lowrank": runs[True][0]["bytes_per_step"],
                   "rso_s_per_step": min(m["seconds_per_step"] for m in runs["rso"]),
                   "measured_bytes_rso": runs["rso"][0]["bytes_per_step"]}
            measured.append(row)
            print(f"2 gloo ranks, {size}: full DDP {full:.3f} s/step, low-rank {low:.3f} s/step "
                  f"(ratio {low / full:.3f}); bytes/step full {row['measured_bytes_full']}, "
                  f"low-rank {row['measured_bytes_lowrank']}", flush=True)
            rso_grads = row["measured_bytes_rso"]["full_gradients"]
            print(f"2 gloo ranks, {size}: rso under DDP {row['rso_s_per_step']:.3f} s/step, "
                  f"bytes/step {rso_grads} (ratio to full DDP "
                  f"{rso_grads / row['measured_bytes_full']['full_gradients']:.3f})", flush=True)
            # FSDP: AdamW against Lotus with the projected backward, alternated likewise
            fsdp = {}
            for i, pb in enumerate((False, True, False, True)):
                mode = ["parallel.engine=fsdp"] + (["optim.name=lotus",
                                                    "optim.projected_backward=true"]
                                                   if pb else ["optim.name=adamw"])
                m = _measure(size, mode, args.steps, args.overrides,
                             Path(tmp) / f"{size}-fsdp-{i}")
                fsdp.setdefault(pb, []).append(m)
            grads = {pb: runs_[0]["bytes_per_step"]["full_gradients"]
                     + runs_[0]["bytes_per_step"]["lowrank_gradients"]
                     for pb, runs_ in fsdp.items()}
            row.update(fsdp_adamw_s_per_step=min(m["seconds_per_step"] for m in fsdp[False]),
                       fsdp_lotus_pb_s_per_step=min(m["seconds_per_step"] for m in fsdp[True]),
                       fsdp_gradient_bytes_adamw=grads[False],
                       fsdp_gradient_bytes_lotus_pb=grads[True],
                       fsdp_gradient_ratio=grads[True] / grads[False])
            print(f"2 gloo ranks, {size}: FSDP gradient bytes/step adamw {grads[False]}, lotus "
                  f"with projected backward {grads[True]} (ratio "
                  f"{row['fsdp_gradient_ratio']:.3f}); s/step "
                  f"{row['fsdp_adamw_s_per_step']:.3f} and {row['fsdp_lotus_pb_s_per_step']:.3f}",
                  flush=True)
    print(json.dumps({"bench": "comm", "refresh_interval": args.refresh_interval,
                      "counted": rows, "measured": measured}))
