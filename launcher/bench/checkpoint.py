"""`lotus-train bench checkpoint`: what a checkpoint costs the training loop, sync vs async.

A LLaMA model of ``--size`` (lotus_dist.model, 20m by default) with AdamW or LotusAdamW
trains on random tokens; every ``--every`` steps the loop saves the trainer's state
(model, optimizer, train state, RNG) through ``launcher.checkpoint``:

- sync: ``save`` inside the step, which returns once the checkpoint is published;
- async: ``save_async`` inside the step (it stages a CPU copy and returns), and the
  first later step that finds ``done()`` calls ``publish()``, as the trainer does.

Each step is timed and classed: a step with a save, a step that published, a step during
which a background write was in flight, and a plain step (none of those). The ``--every``
steps from one save to the next form a window, and each save is measured against the
mean plain step of its own window, so a slow drift of the machine cancels out:
"save/plain" is the save step over that mean, "cost per save" the time the window's
non-plain steps (save, in flight, publish) took above it, which includes the slowdown
of steps that share the CPU with a background write; "call" is the time spent inside
save / save_async / publish. The modes alternate over ``--repeats`` rounds.

Checksums: the CRC32 throughput over the last checkpoint's files (in page cache, as they
are right after a save), the share of a synchronous save that hashing takes, and the
time a load spends verifying.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from launcher import checkpoint
from launcher.checkpoint import _file_checksum, _verify_checksums  # the pieces being measured
from launcher.config import OptimConfig
from launcher.optimizer import build_optimizer
from launcher.train_state import ModelState, OptimizerState, TrainState
from lotus_dist.model import MODEL_SIZES, build_model

MODES = ("sync", "async")


@dataclass
class Window:
    """The ``--every`` steps that begin with one save: its cost is measured against the
    plain steps of the same window, so a slow drift of the machine cancels out."""

    kinds: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    call_s: float = 0.0
    """Seconds inside save / save_async and publish for this checkpoint."""

    baseline: float = 0.0
    """Mean step time without a save, a background write or a publish: of this window's
    plain steps, or of the mode's if a background write outlasted the whole window, or of
    every mode's if it outlasted every window of this mode (a slow disk, a tiny model)."""

    def mean(self, kind: str) -> float | None:
        times = [t for k, t in zip(self.kinds, self.seconds, strict=True) if k == kind]
        return statistics.mean(times) if times else None

    def cost(self) -> float:
        """Seconds this save added to the loop: every non-plain step above the baseline."""
        return sum(t - self.baseline for k, t in zip(self.kinds, self.seconds, strict=True)
                   if k != "plain")


class Bench:
    """One model and optimizer, trained on random tokens, saving on a schedule."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.model_cfg = replace(MODEL_SIZES[args.size], max_seq_len=args.seq_len,
                                 vocab_size=args.vocab_size or MODEL_SIZES[args.size].vocab_size)
        self.model = build_model(self.model_cfg)
        self.optimizer = build_optimizer(replace(OptimConfig(), name=args.optim,
                                                 rank=args.rank), self.model, seed=0)
        self.args = args
        self.train_state = TrainState()

    def state(self) -> dict[str, Any]:
        """What the trainer checkpoints, minus the data loader and schedule."""
        return {"model": ModelState(self.model),
                "optimizer": OptimizerState(self.model, self.optimizer),
                "train_state": self.train_state, "rng": checkpoint.RNGState()}

    def train_step(self) -> None:
        tokens = torch.randint(self.model_cfg.vocab_size, (self.args.batch, self.args.seq_len + 1))
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_state.step += 1

    def run(self, mode: str, ckpt_dir: Path, windows: list[Window]) -> None:
        """``--steps`` steps with a save on the first of every ``--every``; appends one
        Window per save. A background save is published by the first later step that
        finds it done, as the trainer does."""
        pending, window = None, Window()
        for i in range(self.args.steps):
            start = time.perf_counter()
            self.train_step()
            trained = time.perf_counter()
            kind = "plain" if pending is None else "in_flight"
            if i % self.args.every == 0:
                window, kind = Window(), "save"
                windows.append(window)
                if pending is not None:  # not done within --every steps: wait for it
                    pending.publish()
                state, step = self.state(), self.train_state.step
                if mode == "sync":
                    checkpoint.save(ckpt_dir, step, state, keep_latest=2)
                else:
                    pending = checkpoint.save_async(ckpt_dir, step, state, keep_latest=2)
            elif pending is not None and pending.done():
                pending.publish()
                pending, kind = None, "publish"
            end = time.perf_counter()
            window.kinds.append(kind)
            window.seconds.append(end - start)
            window.call_s += end - trained
        if pending is not None:
            pending.publish()


def checksum_costs(bench: Bench, ckpt_dir: Path) -> dict[str, float]:
    """Hash throughput, and hashing's share of a synchronous save and of a load."""
    path = checkpoint.find_latest(ckpt_dir)
    files = [p for p in path.rglob("*") if p.is_file() and p.name != checkpoint.MARKER]
    nbytes = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    for p in files:
        _file_checksum(p)
    hash_s = time.perf_counter() - start
    start = time.perf_counter()
    saved = checkpoint.save(ckpt_dir, bench.train_state.step + 1, bench.state())
    save_s = time.perf_counter() - start
    marker = json.loads((saved / checkpoint.MARKER).read_text())
    start = time.perf_counter()
    _verify_checksums(saved, marker)
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    checkpoint.load(saved, bench.state())
    load_s = time.perf_counter() - start
    return {"checkpoint_gb": nbytes / 1e9, "hash_s": hash_s, "s_per_gb": hash_s / (nbytes / 1e9),
            "sync_save_s": save_s, "hash_share_of_save": hash_s / save_s,
            "load_s": load_s, "verify_s": verify_s, "verify_share_of_load": verify_s / load_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="20m", choices=sorted(MODEL_SIZES))
    parser.add_argument("--optim", default="adamw", choices=["adamw", "lotus"])
    parser.add_argument("--rank", type=int, default=64, help="projection rank (lotus)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary (default: the size's, 32000)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps per mode and round")
    parser.add_argument("--every", type=int, default=10, help="save every this many steps")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of sync then async")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--dir", default=None,
                        help="where to write checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.every < 4:
        parser.error("--every must be at least 4: a save's window needs plain steps to "
                     "compare it with")

    bench = Bench(args)
    for _ in range(args.warmup):
        bench.train_step()
    windows: dict[str, list[Window]] = {mode: [] for mode in MODES}
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-checkpoint-"))
    try:
        for r in range(args.repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                bench.run(mode, root / mode, windows[mode])
        costs = checksum_costs(bench, root / "sync")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report(args, bench, windows, costs)


def report(args: argparse.Namespace, bench: Bench, windows: dict[str, list[Window]],
           costs: dict[str, float]) -> None:
    params = sum(p.numel() for p in bench.model.parameters())
    print(f"{args.size} ({params / 1e6:.1f}M parameters), {args.optim}, batch {args.batch} x "
          f"{args.seq_len}, a save every {args.every} steps, {args.repeats} x {args.steps} "
          f"steps per mode; checkpoint {costs['checkpoint_gb']:.3f} GB")
    print(f"{'mode':>6} {'plain ms':>9} {'save step ms':>13} {'save/plain':>11} "
          f"{'publish step ms':>16} {'in-flight ms':>13} {'in-flight/save':>15} "
          f"{'cost per save ms':>17} {'call ms':>8}")
    plain = [m for ws in windows.values() for w in ws if (m := w.mean("plain")) is not None]
    if not plain:
        sys.exit("bench checkpoint: no step ran without a save or a background write; "
                 "raise --every")
    rows = [_mode_row(mode, ws, statistics.mean(plain)) for mode, ws in windows.items()]
    for row in rows:
        print(f"{row['mode']:>6} {_cell(row['plain_ms']):>9} {_cell(row['save_step_ms']):>13} "
              f"{row['save_over_plain']:11.2f} {_cell(row['publish_step_ms']):>16} "
              f"{_cell(row['in_flight_step_ms']):>13} {row['in_flight_steps_per_save']:15.2f} "
              f"{_cell(row['cost_per_save_ms']):>17} {_cell(row['call_ms']):>8}")
    print(f"checksums: {costs['s_per_gb']:.3f} s per GB hashed (CRC32, page cache); "
          f"{costs['hash_s']:.3f} s of a {costs['sync_save_s']:.3f} s sync save "
          f"({100 * costs['hash_share_of_save']:.1f}%); load {costs['load_s']:.3f} s, of which "
          f"verifying {costs['verify_s']:.3f} s ({100 * costs['verify_share_of_load']:.1f}%)")
    print(json.dumps({"bench": "checkpoint", "size": args.size, "optim": args.optim,
                      "params": params, "every": args.every, "steps": args.steps,
                      "repeats": args.repeats, "modes": rows, "checksums": costs}))


def _mode_row(mode: str, windows: list[Window], all_modes_plain: float) -> dict[str, Any]:
    """Means over a mode's saves; each save's step is compared with its own window's plain
    steps, else the mode's, else every mode's (``all_modes_plain``, seconds)."""
    def mean_of(kind: str) -> float | None:
        values = [m for w in windows if (m := w.mean(kind)) is not None]
        return statistics.mean(values) if values else None

    overall = mean_of("plain")
    for w in windows:
        w.baseline = w.mean("plain") or overall or all_modes_plain
    return {"mode": mode, "saves": len(windows), "own_plain_steps": overall is not None,
            "plain_ms": _ms(statistics.mean(w.baseline for w in windows)),
            "save_step_ms": _ms(mean_of("save")),
            "save_over_plain": statistics.mean(w.mean("save") / w.baseline for w in windows),
            "publish_step_ms": _ms(mean_of("publish")),
            "in_flight_step_ms": _ms(mean_of("in_flight")),
            "in_flight_steps_per_save": statistics.mean(w.kinds.count("in_flight")
                                                        for w in windows),
            "cost_per_save_ms": _ms(statistics.mean(w.cost() for w in windows)),
            "call_ms": _ms(statistics.mean(w.call_s for w in windows))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"
