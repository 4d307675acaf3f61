"""parallel.engine=fsdp through the real trainer: N ranks equal 1 rank, and a run resumes
on another world size (2 -> 4 -> 1) as if it had never stopped.

Each gloo job runs several trainings in a row (one process group each), so the ranks
pay the start-up cost once per world size.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader

from launcher.config import load_config
from launcher.train import run

STEPS = 8


def overrides(corpus: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny LLaMA on the small corpus: 8 steps of 8 x 32 tokens, 2 sequences per
    micro-batch (4, 2 and 1 micro-batches per step on 1, 2 and 4 ranks); refreshes at
    steps 1, 4 and 7 or later, checkpoints only at the end unless asked."""
    return [f"data.path={corpus}", f"data.tokenizer={tokenizer}", f"run.dir={run_dir}",
            "model.max_seq_len=32", "training.seq_len=32", "training.batch_size=8",
            "training.micro_batch_size=2", f"training.steps={STEPS}",
            "training.warmup_steps=2", "training.log_interval=2", "training.grad_clip=1.0",
            "eval.interval=0", "eval.batches=1", "checkpoint.interval=0",
            "checkpoint.keep_latest=0", "optim.rank=8", "optim.lr=0.01",
            "optim.verify_gap=3", "optim.update_proj_gap=3",
            "run.tensorboard=false", "parallel.engine=fsdp", *extra]


OPTIMIZERS = {"lotus": ["optim.name=lotus", "optim.projection=rsvd",
                        "optim.switch=displacement", "optim.gamma=0.5"],
              # fp64: an exact SVD of a spectrum with near ties at rank 8 turns fp32
              # rounding (each shard's addmm_ update) into another basis, which Adam
              # then spreads over every weight (1e-3 to 2e-2 at 4 ranks, by machine)
              "galore": ["optim.name=galore", "training.dtype=fp64"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, jobs: list[tuple[list[str], int]]) -> None:
    """Train each (overrides, port) in turn as one rank of a ``world``-rank job."""
    torch.set_num_threads(1)
    for args, port in jobs:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        run(load_config("configs/tiny.yaml", args))
    # end as the lotus-train executable does (launcher.distributed.exit_process): gloo
    # threads that DTensor's caches keep alive can abort interpreter shutdown (SIGABRT,
    # 'terminate called without an active exception') after every run has finished
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world: int, jobs: list[list[str]]) -> None:
    """Train each job's overrides in turn on ``world`` spawned ranks (one process group
    each, a fresh port each)."""
    mp.spawn(_worker, args=(world, [(args, _free_port()) for args in jobs]), nprocs=world)


def _resume_from(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src`` whose newest checkpoint is ``step``."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "ckpt").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory) -> Path:
    """Run directories: {lotus,galore}-{1,2,4}, resume-4 (from 2 ranks' step 4),
    resume-1 (from resume-4's step 6), and lotus-2-ac / lotus-2-bf16 (2 ranks with
    activation checkpointing / bf16 mixed precision)."""
    root = tmp_path_factory.mktemp("fsdp-trainer")

    def args(name: str, optim: str, *extra: str) -> list[str]:
        return overrides(*small_corpus, root / name, *OPTIMIZERS[optim], *extra)

    for optim in OPTIMIZERS:
        run(load_config("configs/tiny.yaml", args(f"{optim}-1", optim)))
    spawn(2, [args("lotus-2", "lotus", "checkpoint.interval=4"), args("galore-2", "galore"),
               args("lotus-2-ac", "lotus", "parallel.activation_checkpointing=true"),
               args("lotus-2-bf16", "lotus", "parallel.mixed_precision=bf16")])
    _resume_from(root / "lotus-2", root / "resume-4", step=4)
    spawn(4, [args("lotus-4", "lotus"), args("galore-4", "galore"),
               args("resume-4", "lotus", "checkpoint.interval=2")])
    _resume_from(root / "resume-4", root / "resume-1", step=6)
    run(load_config("configs/tiny.yaml", args("resume-1", "lotus")))
    return root


def train_rows(run_dir: Path) -> list[dict]:
    keep = ("step", "loss", "refreshes/self_attn", "refreshes/mlp")
    return [{k: row[k] for k in keep}
            for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


def checkpoint_tensors(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """Whole weights and optimizer tensors of a (possibly sharded) DCP checkpoint."""
    reader = FileSystemReader(run_dir / "ckpt" / f"step-{step}")
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(("model.", "optimizer.state.")) and hasattr(meta, "size")}
    dcp.load(state, storage_reader=reader)
    return state


def assert_same_run(got: Path, ref: Path) -> None:
    got_rows, ref_rows = train_rows(got), train_rows(ref)
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows]
    for g, r in zip(got_rows, ref_rows):
        assert g["loss"] == pytest.approx(r["loss"], rel=2e-4), g["step"]
        assert (g["refreshes/self_attn"], g["refreshes/mlp"]) == \
            (r["refreshes/self_attn"], r["refreshes/mlp"]), g["step"]
    got_summary = json.loads((got / "summary.json").read_text())
    ref_summary = json.loads((ref / "summary.json").read_text())
    assert got_summary["refreshes_per_matrix"] == ref_summary["refreshes_per_matrix"]
    assert got_summary["final_eval_loss"] == pytest.approx(ref_summary["final_eval_loss"],
                                                           rel=2e-4)
    got_tensors, ref_tensors = checkpoint_tensors(got), checkpoint_tensors(ref)
    assert got_tensors.keys() == ref_tensors.keys()
    for key, value in ref_tensors.items():
        # Relative to each tensor's norm: summation order moves single elements of
        # Adam's second moment (near zero) by more than their own size.
        error = (got_tensors[key] - value).norm() / value.norm().clamp_min(1e-12)
        assert error < 1e-4, (key, float(error))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_fsdp_n_ranks_equal_one_rank(runs, optim, world):
    """Same losses, same refreshes at the same logged steps, same final weights and
    optimizer state (moments, bases) as one process on the same global batches."""
    assert_same_run(runs / f"{optim}-{world}", runs / f"{optim}-1")
    summary = json.loads((runs / f"{optim}-{world}" / "summary.json").read_text())
    assert summary["engine"] == "fsdp" and summary["world_size"] == world
    assert min(summary["refreshes_per_matrix"].values()) >= 3


@pytest.mark.slow
def test_fsdp_run_resumes_on_more_ranks(runs):
    """Saved by 2 ranks at step 4, continued by 4: the same run as one process's."""
    assert_same_run(runs / "resume-4", runs / "lotus-1")


@pytest.mark.slow
def test_fsdp_run_resumes_in_one_process(runs):
    """Saved sharded by 4 ranks at step 6, continued by one process."""
    assert_same_run(runs / "resume-1", runs / "lotus-1")


@pytest.mark.slow
def test_fsdp_reports_bytes_per_step_by_kind(runs):
    bytes_per_step = json.loads((runs / "lotus-4" / "summary.json").read_text())["bytes_per_step"]
    assert bytes_per_step["param_allgathers"] > bytes_per_step["full_gradients"] > 0
    assert 0 < bytes_per_step["sketches"] < bytes_per_step["full_gradients"] / 10
    assert bytes_per_step["lowrank_gradients"] == 0  # tiny's sizes all divide 4


@pytest.mark.slow
def test_fsdp_activation_checkpointing_recomputes_the_same_run(runs):
    """Recomputing each block in backward changes memory, not the numbers."""
    assert_same_run(runs / "lotus-2-ac", runs / "lotus-1")


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_the_fp32_run(runs):
    """bf16 weights in forward and backward, fp32 gradient reduction and fp32 sharded
    masters: the losses follow the fp32 run to bf16 precision, and the model learns."""
    got, ref = train_rows(runs / "lotus-2-bf16"), train_rows(runs / "lotus-1")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], rel=2e-2), g["step"]
    assert got[-1]["loss"] < got[0]["loss"] - 0.5
    weights = checkpoint_tensors(runs / "lotus-2-bf16")
    assert all(t.dtype == torch.float32 for k, t in weights.items() if k.startswith("model."))
