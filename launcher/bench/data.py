"""`lotus-train bench data`: tokens per second delivered to one rank, stream against store,
and `data prepare` throughput with 1 and 2 worker processes, in one run.

Corpus: ``--copies`` copies of the train split of ``--data`` (the embedded sample corpus
by default, built on first use), so that preparing it takes long enough to time.

- prepare: ``prepare_store`` of that corpus (train split) with 1 and with 2 workers,
  alternating over ``--repeats`` rounds, wall time including the pool's start (the
  fork server the workers come from is started once before, untimed); tokens/s
  is the median over rounds, and the stores must be byte-identical. A calibration first
  runs a CPU-bound loop in 1 and then 2 processes: on a machine whose cores are busy
  with other work, its ratio (below 2) bounds what 2 workers can gain. So the CPU
  seconds are reported too (the workers' own, on their tasks, and the main process's),
  with the speedup they project on free cores: the main process and the workers side
  by side, max((workers + main) / cores, workers / n, main).
- delivery: rank 0 of W (one process, the loader alone, no prefetch thread), timed
  after one untimed batch for ``--seconds`` and at least 2 batches; tokens/s per rank =
  rows x seq_len per second, the median of ``--delivery-repeats`` rounds over all rows;
  also per CPU-second of the process (robust to other load on the machine).
  Two batch shapes: a fixed per-rank batch (``--local-batch``, global batch = local x
  W: each rank's work per step is the same at every W, so a loader whose per-rank cost
  is O(1/W) of the global batch is flat), and a fixed global batch
  (``--global-batch``; the rank's slice shrinks with W).
  The stream is PackedBatches on the corpus (every rank tokenizes the whole global
  batch); the store is StoreBatches (shuffled) on a store holding ``--tile`` copies
  of the prepared token stream, so that an epoch spans many global batches, as on C4
  (per-rank delivery does not depend on the tokens' values).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lotus_dist.data import (
    LocalDocuments,
    PackedBatches,
    StoreBatches,
    TokenStore,
    ensure_sample_assets,
    load_tokenizer,
    prepare_store,
)
from lotus_dist.data.prepare import start_worker_server, write_token_store

SAMPLE = Path("data/sample")


def _spin(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n


def _default_sigterm() -> None:
    """Pool.terminate() must end a forked worker whatever handler the parent had."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def parallel_capacity(seconds: float = 0.5) -> float:
    """Work done by 2 busy processes over 1 busy process in the same time (2.0 on 2 free
    cores; lower when other processes share the machine)."""
    context = multiprocessing.get_context("fork")
    with context.Pool(2, _default_sigterm) as pool:
        one = sum(pool.map(_spin, [seconds]))
        two = sum(pool.map(_spin, [seconds, seconds]))
    return two / one


def copy_corpus(data: Path, out: Path, copies: int) -> Path:
    """`copies` copies of the train files (renamed so they sort copy by copy)."""
    out.mkdir(parents=True)
    for k in range(copies):
        for path in LocalDocuments(data, "train").files:
            shutil.copyfile(path, out / f"c4-train.{k:03d}.{path.name}")
    return out


def store_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def time_prepare(corpus: Path, tokenizer: str, out: Path, workers: int) -> dict[str, Any]:
    result = prepare_store(str(corpus), tokenizer, out, splits=["train"], workers=workers,
                           progress=False)
    return {"workers": workers, "seconds": result["seconds"], "tokens": result["tokens"],
            "tok_per_s": result["tokens_per_s"], "worker_cpu_s": result["worker_cpu_s"],
            "main_cpu_s": result["main_cpu_s"], "hash": store_hash(out)}


def time_loader(make: Any, rows: int, seq_len: int, seconds: float) -> dict[str, Any]:
    loader = make()
    next(loader)  # untimed: the stream's first chunk, the store's first window
    start, cpu, batches = time.perf_counter(), time.process_time(), 0
    while batches < 2 or time.perf_counter() - start < seconds:
        batch = next(loader)
        batches += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert batch.shape == (rows, seq_len + 1)
    tokens = batches * rows * seq_len
    return {"batches": batches, "seconds": elapsed, "tok_per_s_rank": tokens / elapsed,
            "tok_per_cpu_s_rank": tokens / max(cpu, 1e-9)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SAMPLE),
                        help="C4-layout folder (default: the sample corpus, built if missing)")
    parser.add_argument("--tokenizer", default=str(SAMPLE / "tokenizer.json"))
    parser.add_argument("--copies", type=int, default=4, help="copies of the train split")
    parser.add_argument("--tile", type=int, default=40,
                        help="copies of the token stream in the delivery store")
    parser.add_argument("--shard-tokens", type=int, default=1 << 22,
                        help="shard size of the delivery store (rows come from many shards)")
    parser.add_argument("--worlds", default="1,8,64", help="world sizes W (rank 0 is timed)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--local-batch", type=int, default=16, help="rows per rank (scheme 1)")
    parser.add_argument("--global-batch", type=int, default=512, help="global rows (scheme 2)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed per delivery row")
    parser.add_argument("--delivery-repeats", type=int, default=3,
                        help="rounds over the delivery rows (the median is reported)")
    parser.add_argument("--workers", default="1,2", help="prepare worker counts")
    parser.add_argument("--repeats", type=int, default=2, help="prepare rounds")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    if args.global_batch % max(worlds):
        parser.error(f"--global-batch {args.global_batch} must be a multiple of every W")

    if Path(args.data) == SAMPLE:
        ensure_sample_assets(SAMPLE, args.tokenizer)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-data-"))
    try:
        corpus = copy_corpus(Path(args.data), root / "corpus", args.copies)
        capacity = parallel_capacity()
        start_worker_server()  # once per process: not part of any timed prepare
        prepare: list[dict[str, Any]] = []
        for r in range(args.repeats):
            for w in worker_counts if r % 2 == 0 else worker_counts[::-1]:
                prepare.append(time_prepare(corpus, args.tokenizer, root / f"store-{w}-{r}", w))
        hashes = {p["hash"] for p in prepare}
        tokenizer = load_tokenizer(args.tokenizer)
        prepared = TokenStore(root / f"store-{worker_counts[0]}-0").split("train")
        stream = prepared.read_tokens(0, prepared.tokens)
        write_token_store(root / "tiled", {"train": np.tile(stream, args.tile)}, tokenizer,
                          args.tokenizer, shard_tokens=args.shard_tokens,
                          source=f"{args.tile} x {corpus}")
        tiled = TokenStore(root / "tiled").split("train")
        runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for _ in range(args.delivery_repeats):  # rounds over every row: drift hits all
            for scheme in ("local", "global"):
                for w in worlds:
                    batch = args.local_batch * w if scheme == "local" else args.global_batch
                    makers = {
                        "stream": lambda b=batch, w=w: PackedBatches(
                            LocalDocuments(corpus, "train"), tokenizer, args.seq_len, b, 0, w),
                        "store": lambda b=batch, w=w: StoreBatches(tiled, args.seq_len, b, 0,
                                                                   w),
                    }
                    for source, make in makers.items():
                        row = time_loader(make, batch // w, args.seq_len, args.seconds)
                        runs.setdefault((source, scheme, w), []).append(row)
        delivery = []
        for (source, scheme, w), rows in runs.items():
            batch = args.local_batch * w if scheme == "local" else args.global_batch
            delivery.append({
                "source": source, "scheme": scheme, "world_size": w, "global_batch": batch,
                "rows_per_rank": batch // w, "batches": sum(r["batches"] for r in rows),
                "tok_per_s_rank": statistics.median(r["tok_per_s_rank"] for r in rows),
                "tok_per_cpu_s_rank": statistics.median(r["tok_per_cpu_s_rank"] for r in rows),
                "runs_tok_per_s_rank": [r["tok_per_s_rank"] for r in rows]})
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report(args, capacity, prepare, len(hashes) == 1, delivery, prepared.tokens, tiled.tokens)


def _projected_seconds(worker_cpu: float, main_cpu: float, workers: int, cores: int) -> float:
    """Wall time on `cores` free cores: the main process and the workers run side by
    side, the workers' share split evenly, none faster than the CPU it needs."""
    return max((worker_cpu + main_cpu) / cores, worker_cpu / workers, main_cpu)


def report(args: argparse.Namespace, capacity: float, prepare: list[dict[str, Any]],
           identical: bool, delivery: list[dict[str, Any]], corpus_tokens: int,
           tiled_tokens: int) -> None:
    print(f"bench data: {args.copies} copies of {args.data} ({corpus_tokens:,} tokens), "
          f"seq_len {args.seq_len}; store for delivery: {tiled_tokens:,} tokens "
          f"({tiled_tokens // (args.seq_len + 1):,} blocks)")
    print(f"parallel capacity (2 busy processes / 1): {capacity:.2f}"
          + ("  <- the machine is shared: wall-clock ratios understate" if capacity < 1.8
             else ""))
    print(f"{'prepare':>8} {'workers':>8} {'median s':>9} {'tok/s':>10} {'worker cpu s':>13} "
          f"{'main cpu s':>11} {'tok/worker-cpu-s':>17}")
    by_workers: dict[int, dict[str, Any]] = {}
    for w in sorted({p["workers"] for p in prepare}):
        runs = [p for p in prepare if p["workers"] == w]
        v = {key: statistics.median(p[key] for p in runs)
             for key in ("seconds", "tok_per_s", "worker_cpu_s", "main_cpu_s", "tokens")}
        v["tok_per_worker_cpu_s"] = v["tokens"] / max(v["worker_cpu_s"], 1e-9)
        v["runs_tok_per_s"] = [p["tok_per_s"] for p in runs]
        by_workers[w] = v
        print(f"{'':>8} {w:>8} {v['seconds']:9.2f} {v['tok_per_s']:10,.0f} "
              f"{v['worker_cpu_s']:13.2f} {v['main_cpu_s']:11.2f} "
              f"{v['tok_per_worker_cpu_s']:17,.0f}")
    counts = sorted(by_workers)
    speedup = projected = None
    if len(counts) > 1:
        one, many = by_workers[counts[0]], by_workers[counts[-1]]
        speedup = many["tok_per_s"] / one["tok_per_s"]
        cores = counts[-1]
        projected = (_projected_seconds(one["worker_cpu_s"], one["main_cpu_s"], counts[0], cores)
                     / _projected_seconds(many["worker_cpu_s"], many["main_cpu_s"], counts[-1],
                                          cores))
        print(f"prepare {counts[-1]} workers / {counts[0]}: {speedup:.2f}x measured, "
              f"{projected:.2f}x projected on {cores} free cores from the CPU times "
              f"(stores byte-identical: {identical})")
    print(f"{'source':>7} {'batch':>20} {'W':>4} {'rows/rank':>10} {'batches':>8} "
          f"{'tok/s per rank':>15} {'vs W=1':>7} {'tok/cpu-s':>13} {'vs W=1':>7}")
    w1 = min(r["world_size"] for r in delivery)
    for row in delivery:
        base = next(r for r in delivery if r["source"] == row["source"]
                    and r["scheme"] == row["scheme"] and r["world_size"] == w1)
        row["vs_w1"] = row["tok_per_s_rank"] / base["tok_per_s_rank"]
        row["cpu_vs_w1"] = row["tok_per_cpu_s_rank"] / base["tok_per_cpu_s_rank"]
        shape = (f"local {args.local_batch} (B={row['global_batch']})"
                 if row["scheme"] == "local" else f"global {row['global_batch']}")
        print(f"{row['source']:>7} {shape:>20} {row['world_size']:>4} "
              f"{row['rows_per_rank']:>10} {row['batches']:>8} "
              f"{row['tok_per_s_rank']:15,.0f} {row['vs_w1']:7.2f} "
              f"{row['tok_per_cpu_s_rank']:13,.0f} {row['cpu_vs_w1']:7.2f}")
    store_local = [r for r in delivery if r["source"] == "store" and r["scheme"] == "local"]
    store_all = [r for r in delivery if r["source"] == "store"]
    targets = {
        "store_flat_in_w": min(r["vs_w1"] for r in store_local) >= 0.9,
        "store_flat_in_w_cpu": min(r["cpu_vs_w1"] for r in store_local) >= 0.9,
        "store_min_10m_per_rank": min(r["tok_per_s_rank"] for r in store_all) >= 10e6,
        "prepare_2_workers_1_7x": speedup is not None and speedup >= 1.7,
        "prepare_2_workers_1_7x_projected": projected is not None and projected >= 1.7,
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in targets.items()))
    print(json.dumps({"bench": "data", "seq_len": args.seq_len, "copies": args.copies,
                      "corpus_tokens": corpus_tokens, "store_tokens": tiled_tokens,
                      "local_batch": args.local_batch, "global_batch": args.global_batch,
                      "parallel_capacity": capacity,
                      "prepare": {str(w): v for w, v in by_workers.items()},
                      "prepare_speedup": speedup, "prepare_speedup_projected": projected,
                      "prepare_identical": identical, "delivery": delivery,
                      "targets": targets}))
