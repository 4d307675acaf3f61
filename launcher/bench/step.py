"""`lotus-train bench step`: wall time and peak memory of a full training step, per optimizer.

For each model size, adamw, galore and lotus train from the same initial weights (same
seed) on the same pre-generated batches of real tokens (the config's corpus and
tokenizer, batch, micro-batch and sequence length). A timed step is the trainer's own
``Trainer.train_step``: micro-batch forward and backward, gradient clipping,
``optimizer.step()`` (refreshes included), scheduler step and ``zero_grad``; on CUDA it is
synchronised before and after. It reports the median and mean step time, the total, the
refresh spike (slowest step / median step), the refreshes during the timed steps, the
optimizer part of the step (clipping and ``optimizer.step()``, where the optimizers
differ; forward and backward are the same for all), peak memory, and the ratios of
total time against adamw and galore from the same run.

How the optimizers share the machine: each optimizer lives in its own spawned worker
process, and the workers take turns, one at a time, running blocks of ``--block``
steps, cycling through every order of the optimizers (A B C, A C B, B A C, ...) so that
each runs equally often first, last and after each other one. A slow drift of the
machine (other jobs, thermal state) therefore lands on every optimizer alike, and
separate processes keep each one's memory measurement its own. A process's own speed
varies by a few percent with where its memory happens to land, so ``--repeats`` runs
the whole schedule again with fresh workers and the statistics pool all repeats.
Untimed warm-up steps (``--warmup-steps``) run first in each worker; with the default
they include the initial refresh every low-rank optimizer does on its first step.

Peak memory: on CUDA, the allocator's peak over the timed steps (reset after warm-up).
On CPU, the worker's peak resident set (VmHWM, reset after warm-up through
/proc/self/clear_refs) minus its resident set before the model was built: model,
gradients, optimizer state, activations and refresh workspace, as the C allocator
holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from launcher.bench.projector import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
from launcher.capabilities import plan_run
from launcher.config import Config, load_config
from launcher.data import build_sample_if_default, model_vocab_size
from launcher.distributed import DistInfo
from launcher.engines import build_engine
from launcher.schedule import build_lr_scheduler
from launcher.trainer import Trainer
from lotus_dist import LotusAdamW, RSOAdamW
from lotus_dist.data import PackedBatches, load_tokenizer, open_documents
from lotus_dist.model import MODEL_SIZES

OPTIMIZERS = ("adamw", "galore", "lotus")
#: Further rows, each a method with settings: lotus_pb is lotus with the projected
#: backward (no full gradient of a projected weight outside refresh steps).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "lotus_pb": ("lotus", ["optim.projected_backward=true"]),
    "rso": ("rso", []),
}
# What the projected group actually used (gamma resolved by the optimizer), for the report.
PROJECTED_KEYS = ("rank", "projection", "switch", "update_proj_gap", "gamma", "verify_gap",
                  "min_gap", "power_iters", "oversample", "scale")


def generate_batches(cfg: Config, count: int) -> tuple[torch.Tensor, int]:
    """``count`` global batches of the config's corpus, once for every optimizer and size,
    and the model vocabulary (the tokenizer's unless model.vocab_size is set)."""
    d, t = cfg.data, cfg.training
    build_sample_if_default(d)
    tokenizer = load_tokenizer(d.tokenizer)
    batches = PackedBatches(open_documents(d.path, "train", d.on_error), tokenizer, t.seq_len,
                            t.batch_size, seed=t.seed, shuffle_chunk=d.shuffle_chunk,
                            shuffle=d.shuffle)
    return torch.stack([next(batches) for _ in range(count)]), model_vocab_size(cfg, tokenizer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _refresh_total(optimizer: torch.optim.Optimizer) -> int:
    """Refreshes (rso: new subspaces) so far, summed over the projected matrices (0 for
    adamw)."""
    if not isinstance(optimizer, LotusAdamW | RSOAdamW):
        return 0
    return sum(int(t["refresh_count"]) for t in optimizer.telemetry().values())


def _worker(conn: Connection, cfg: Config, batches_path: str, device_name: str,
            warmup_steps: int, threads: int) -> None:
    """One optimizer in its own process: build, warm up, then run step blocks on request."""
    try:
        torch.set_num_threads(threads)
        _serve(conn, cfg, batches_path, torch.device(device_name), warmup_steps)
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _serve(conn: Connection, cfg: Config, batches_path: str, device: torch.device,
           warmup_steps: int) -> None:
    data = iter(torch.load(batches_path, weights_only=True))
    baseline = 0 if device.type == "cuda" else _rss_bytes()
    model_cfg = dataclasses.replace(MODEL_SIZES[cfg.model.size], vocab_size=cfg.model.vocab_size,
                                    max_seq_len=cfg.model.max_seq_len)
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(cfg.training.seed)
    plan = plan_run(cfg, 1, grouped=False, device=device)
    engine = build_engine(cfg, model_cfg, dist_info, plan)
    scheduler = build_lr_scheduler(engine.optimizer, cfg.training.warmup_steps,
                                   cfg.training.steps, cfg.training.min_lr_ratio)
    trainer = Trainer(cfg, dist_info, engine, scheduler, None, None, plan.accum_steps)
    optimizer = engine.optimizer
    optimizer_seconds = _time_optimizer_part(engine, device)
    for _ in range(warmup_steps):
        trainer.train_step(data)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    projected = [g for g in optimizer.param_groups if "rank" in g]
    settings = {k: projected[0][k] for k in PROJECTED_KEYS} if projected else {}
    if isinstance(optimizer, RSOAdamW):
        settings = {"rso": True, "rank": cfg.optim.rank, "update_proj_gap":
                    optimizer.rso_group["period_steps"]}
    conn.send(("ready", {
        "params": sum(p.numel() for p in engine.raw_model.parameters()),
        "matrices": sum(len(g["params"]) for g in projected) or sum(
            len(g["params"]) for g in optimizer.param_groups if g.get("rso")),
        "settings": settings,
    }))
    loss = float("nan")
    while True:
        command, count = conn.recv()
        if command == "finish":
            break
        rows = []
        for _ in range(count):
            before = _refresh_total(optimizer)
            optimizer_seconds[0] = 0.0
            _sync(device)
            start = time.perf_counter()
            loss = trainer.train_step(data).loss
            _sync(device)
            rows.append((time.perf_counter() - start, _refresh_total(optimizer) - before,
                         optimizer_seconds[0]))
        conn.send(("steps", rows))
    if device.type == "cuda":
        peak, peak_total = torch.cuda.max_memory_allocated(device), None
    else:
        peak_total = _peak_rss_bytes()
        peak = peak_total - baseline
    conn.send(("done", {"peak_bytes": peak, "peak_rss_bytes": peak_total, "final_loss": loss,
                        "skipped_steps": trainer.state.skipped_steps}))


def _time_optimizer_part(engine: Any, device: torch.device) -> list[float]:
    """Wrap the engine's clipping and update so that their time adds up in the returned
    one-element list (the caller resets it per step)."""
    total = [0.0]

    def timed(fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                _sync(device)
                total[0] += time.perf_counter() - start
        return wrapper

    engine.clip_grad_norm = timed(engine.clip_grad_norm)
    engine.optimizer_step = timed(engine.optimizer_step)
    return total


def _receive(conn: Connection, expected: str) -> Any:
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"benchmark worker failed:\n{payload}")
    if kind != expected:
        raise RuntimeError(f"benchmark worker sent {kind!r}, expected {expected!r}")
    return payload


def run_size(cfgs: dict[str, Config], batches_path: str, device: str, steps: int,
             warmup_steps: int, block: int, threads: int,
             repeats: int = 1) -> dict[str, dict[str, Any]]:
    """Time ``steps`` steps of every optimizer in ``cfgs`` per repeat, with fresh workers
    each repeat, and summarise all repeats' steps together."""
    times: dict[str, list[tuple[float, int, float]]] = {name: [] for name in cfgs}
    info: dict[str, dict[str, Any]] = {}
    repeat_totals: dict[str, list[float]] = {name: [] for name in cfgs}
    start = time.perf_counter()
    for repeat in range(repeats):
        rep_times, rep_info = _run_workers(cfgs, batches_path, device, steps, warmup_steps,
                                           block, threads, first_order=repeat,
                                           progress=(repeat * steps, repeats * steps, start))
        for name in cfgs:
            times[name] += rep_times[name]
            repeat_totals[name].append(sum(s for s, _, _ in rep_times[name]))
            if name in info:  # peak over the repeats; the rest is the same each time
                rep_info[name]["peak_bytes"] = max(info[name]["peak_bytes"],
                                                   rep_info[name]["peak_bytes"])
            info[name] = rep_info[name]
    return {name: summarize(times[name]) | info[name] | {"repeat_total_s": repeat_totals[name]}
            for name in cfgs}


def _run_workers(cfgs: dict[str, Config], batches_path: str, device: str, steps: int,
                 warmup_steps: int, block: int, threads: int, first_order: int,
                 progress: tuple[int, int, float]) -> tuple[dict[str, list], dict[str, dict]]:
    """One worker per optimizer; blocks of steps in every order in turn."""
    ctx = mp.get_context("spawn")
    orders = list(itertools.permutations(cfgs))
    workers: dict[str, tuple[Any, Connection]] = {}
    try:
        for name, cfg in cfgs.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, cfg, batches_path, device,
                                                     warmup_steps, threads), daemon=True)
            proc.start()
            child.close()
            workers[name] = (proc, parent)
        info = {name: _receive(conn, "ready") for name, (_, conn) in workers.items()}
        times: dict[str, list[tuple[float, int, float]]] = {name: [] for name in cfgs}
        done, turn = 0, first_order
        offset, total, start = progress
        while done < steps:
            count = min(block, steps - done)
            for name in orders[turn % len(orders)]:
                conn = workers[name][1]
                conn.send(("steps", count))
                times[name] += _receive(conn, "steps")
            done, turn = done + count, turn + 1
            _progress(offset + done, count, total, time.perf_counter() - start)
        for name, (proc, conn) in workers.items():
            conn.send(("finish", 0))
            info[name] |= _receive(conn, "done")
            proc.join()
        return times, info
    finally:
        for proc, conn in workers.values():
            conn.close()
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _progress(done: int, count: int, steps: int, elapsed: float) -> None:
    """A line on stderr at each quarter of the timed steps: a CPU run can take long."""
    if done * 4 // steps > (done - count) * 4 // steps:
        eta = elapsed * (steps - done) / done
        print(f"  {done}/{steps} steps, {elapsed:.0f} s, eta {eta:.0f} s", file=sys.stderr,
              flush=True)


def summarize(rows: list[tuple[float, int, float]]) -> dict[str, Any]:
    """Step-time statistics; the spike is the slowest step over the median step."""
    seconds = [s for s, _, _ in rows]
    median = statistics.median(seconds)
    refresh_times = [s for s, n, _ in rows if n]
    return {
        "steps": len(seconds),
        "median_ms": 1e3 * median,
        "mean_ms": 1e3 * statistics.fmean(seconds),
        "total_s": sum(seconds),
        "spike": max(seconds) / median,
        "refreshes": sum(n for _, n, _ in rows),
        "refresh_steps": len(refresh_times),
        "refresh_step_ms": 1e3 * statistics.fmean(refresh_times) if refresh_times else None,
        "optimizer_mean_ms": 1e3 * statistics.fmean(o for _, _, o in rows),
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Total (and median) step time, and the optimizer part's mean, of each pair the
    issue's targets compare; the total's ratio in each repeat shows the run-to-run spread."""
    out = {}
    for a, b in (("lotus", "adamw"), ("galore", "adamw"), ("lotus", "galore"),
                 ("lotus_pb", "lotus"), ("lotus_pb", "adamw"), ("rso", "adamw"),
                 ("rso", "lotus")):
        if a in results and b in results:
            out[f"{a}/{b}"] = results[a]["total_s"] / results[b]["total_s"]
            out[f"{a}/{b}_median"] = results[a]["median_ms"] / results[b]["median_ms"]
            out[f"{a}/{b}_optimizer"] = (results[a]["optimizer_mean_ms"]
                                         / results[b]["optimizer_mean_ms"])
            out[f"{a}/{b}_repeats"] = [x / y for x, y in zip(results[a]["repeat_total_s"],
                                                             results[b]["repeat_total_s"])]
    return out


def rank_for(size: str, base: Config, overrides: list[str]) -> int:
    """--set optim.rank applies to every size; otherwise the config's own size keeps its
    optim.rank and other sizes take dim/4, the rule every configs/*.yaml follows."""
    if any(o.partition("=")[0].strip() == "optim.rank" for o in overrides):
        return base.optim.rank
    if size == base.model.size:
        return base.optim.rank
    return MODEL_SIZES[size].dim // 4


def _settings_text(settings: dict[str, Any]) -> str:
    if not settings:
        return "full rank"
    if settings.get("rso"):
        return (f"rank {settings['rank']}, random subspace per linear, W frozen for "
                f"update_proj_gap={settings['update_proj_gap']} steps")
    if settings["switch"] == "fixed":
        return (f"rank {settings['rank']}, {settings['projection']}, refresh every "
                f"update_proj_gap={settings['update_proj_gap']} steps")
    keys = ("gamma", "verify_gap", "min_gap", "power_iters", "oversample")
    return (f"rank {settings['rank']}, {settings['projection']}, {settings['switch']} "
            + " ".join(f"{k}={settings[k]}" for k in keys))


def _print_size(size: str, results: dict[str, dict[str, Any]], device: str) -> None:
    memory = "peak MB" if device.startswith("cuda") else "peak MB*"
    print(f"\n{size} ({next(iter(results.values()))['params'] / 1e6:.2f}M params)")
    for name, r in results.items():
        print(f"  {name:<7} {_settings_text(r['settings'])}")
    print(f"  {'optimizer':<9} {'median ms':>9} {'mean ms':>8} {'optim ms':>8} {'total s':>8} "
          f"{'spike':>6} {'refreshes':>9} {'(steps)':>7} {'refresh-step ms':>15} {memory:>9} "
          f"{'loss':>6}")
    for name, r in results.items():
        refresh_ms = "-" if r["refresh_step_ms"] is None else f"{r['refresh_step_ms']:.1f}"
        print(f"  {name:<9} {r['median_ms']:9.1f} {r['mean_ms']:8.1f} "
              f"{r['optimizer_mean_ms']:8.2f} {r['total_s']:8.2f} {r['spike']:6.2f} "
              f"{r['refreshes']:9d} {r['refresh_steps']:7d} {refresh_ms:>15} "
              f"{r['peak_bytes'] / 2**20:9.1f} {r['final_loss']:6.3f}")
    pairs = ratios(results)
    if pairs:
        print("  total-time ratios (per repeat; median step; optimizer part):")
        for k, v in pairs.items():
            if "_" not in k:
                each = ", ".join(f"{x:.3f}" for x in pairs[k + "_repeats"])
                print(f"    {k:<12} {v:.3f} ({each}; median {pairs[k + '_median']:.3f}; "
                      f"optimizer part {pairs[k + '_optimizer']:.3f})")


def targets(pairs: dict[str, float]) -> dict[str, bool]:
    """The issue's CPU targets, reported, not asserted."""
    out = {}
    if "lotus/adamw" in pairs:
        out["lotus_total_le_1.05x_adamw"] = pairs["lotus/adamw"] <= 1.05
    if "lotus/galore" in pairs:
        out["lotus_total_le_galore"] = pairs["lotus/galore"] <= 1.0
    return out


def _method_sets(name: str) -> list[str]:
    """The ``--set`` overrides of a row: its method, and a variant's settings."""
    method, sets = VARIANTS.get(name, (name, []))
    return [f"optim.name={method}", *sets]


def _split(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown or not items:
        raise SystemExit(f"lotus-train bench step: unknown {what} {unknown or text!r}; "
                         f"choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml",
                        help="YAML config: data, batch sizes and optimizer settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--sizes", default="tiny,20m", help="comma-separated model sizes")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated optimizers (also lotus_pb: lotus with "
                             "optim.projected_backward=true, and rso)")
    parser.add_argument("--steps", type=int, default=200,
                        help="timed steps per optimizer (enough to amortise refreshes)")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="untimed steps first (they include the initial refresh)")
    parser.add_argument("--block", type=int, default=10,
                        help="steps an optimizer runs before the next one takes its turn")
    parser.add_argument("--repeats", type=int, default=2,
                        help="run the schedule this many times, each with fresh workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads of each worker (default: torch's, %(default)s)")
    args = parser.parse_args(argv)
    if min(args.steps, args.block, args.threads, args.repeats) < 1 or args.warmup_steps < 0:
        parser.error("--steps, --block, --threads and --repeats must be >= 1, "
                     "--warmup-steps >= 0")
    sizes = _split(args.sizes, list(MODEL_SIZES), "size")
    optimizers = _split(args.optimizers, (*OPTIMIZERS, *VARIANTS), "optimizer")

    base = load_config(args.config, args.overrides)
    batches, vocab = generate_batches(base, args.warmup_steps + args.steps)
    t = base.training
    print(f"bench step: device {args.device}, {args.threads} threads, config "
          f"{args.config} {' '.join(args.overrides)}".rstrip())
    print(f"  {args.repeats} x {args.steps} timed steps, each after {args.warmup_steps} "
          f"warm-up steps, turns of {args.block} steps; global batch {t.batch_size} "
          f"(micro {t.micro_batch_size}) x seq {t.seq_len}, vocab {vocab}, "
          f"grad_clip {t.grad_clip}", flush=True)
    rows, pairs_by_size, targets_by_size = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        batches_path = str(Path(tmp) / "batches.pt")
        torch.save(batches, batches_path)
        for size in sizes:
            extra = [f"model.size={size}", f"model.vocab_size={vocab}",
                     f"optim.rank={rank_for(size, base, args.overrides)}"]
            cfgs = {name: load_config(args.config, [*args.overrides, *extra,
                                                    *_method_sets(name)])
                    for name in optimizers}
            results = run_size(cfgs, batches_path, args.device, args.steps, args.warmup_steps,
                               args.block, args.threads, args.repeats)
            _print_size(size, results, args.device)
            pairs_by_size[size] = ratios(results)
            targets_by_size[size] = targets(pairs_by_size[size])
            rows += [{"size": size, "optimizer": name, **r} for name, r in results.items()]
    if not args.device.startswith("cuda"):
        print("\n* peak resident set of the optimizer's own process above its resident set "
              "before the model was built")
    print(json.dumps({"bench": "step", "device": args.device,
                      "threads": args.threads, "config": args.config,
                      "overrides": args.overrides, "steps": args.steps,
                      "repeats": args.repeats,
                      "warmup_steps": args.warmup_steps, "block": args.block,
                      "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size,
                      "seq_len": t.seq_len, "vocab_size": vocab, "rows": rows,
                      "ratios": pairs_by_size, "targets": targets_by_size}))
