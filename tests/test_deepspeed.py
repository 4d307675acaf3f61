"""DeepSpeed engine: AdamW at ZeRO-1/2/3 equals DDP, Lotus at ZeRO-0 (fp32 and bf16) and ZeRO-1/2
equals single-process Lotus, checkpoints resume exactly, the deepspeed CLI launches the trainer,
and every unsupported combination fails before the first step with an error naming the engine
to use instead.

Multi-rank runs are 2 gloo ranks under torchrun, each cached per session so that the equality
and resume tests share them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from small_runs import metric_rows, small_run, train_rows

pytest.importorskip("deepspeed")

import torch
import torch.distributed as dist

from launcher.capabilities import plan_run
from launcher.config import ConfigError, load_config
from launcher.distributed import DistInfo
from launcher.engines import build_engine
from launcher.engines.deepspeed import deepspeed_config
from launcher.optimizer import build_optimizer
from launcher.train import run
from lotus_dist.deepspeed import PartitionLayoutError, ZeroLotusAdamW
from lotus_dist.model import MODEL_SIZES, build_model

REPO = Path(__file__).resolve().parents[1]
TINY = dataclasses.replace(MODEL_SIZES["tiny"], vocab_size=512, max_seq_len=32)
CPU = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))


def zero(stage: int) -> str:
    return f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json"


def overrides(corpus: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny model: 12 steps of 8 x 32 tokens. gamma=2 refreshes at every check (steps 1,
    4, 7, 10), so a threshold that rounding could flip never decides a refresh."""
    return small_run(corpus, tokenizer, run_dir, "training.steps=12", "training.warmup_steps=2",
                     "training.log_interval=1", "eval.interval=6", "eval.batches=1",
                     "checkpoint.interval=6", "checkpoint.keep_latest=0", "optim.verify_gap=3",
                     "optim.gamma=2.0", "optim.lr=0.01", *extra)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def torchrun(run_dir: Path, sets: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    return subprocess.run([*launch, "-m", "launcher", "train", "--config", "configs/tiny.yaml",
                           *(f"--set={s}" for s in sets)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def cached_runs(tmp_path_factory, prefix: str, train: Callable[[Path, tuple[str, ...]], None]):
    """launch(*overrides) -> run dir of ``train(run_dir, overrides)``, run once per session."""
    cache: dict[tuple[str, ...], Path] = {}

    def launch(*extra: str) -> Path:
        if extra not in cache:
            cache[extra] = tmp_path_factory.mktemp(prefix)
            train(cache[extra], extra)
        return cache[extra]

    return launch


@pytest.fixture(scope="session")
def launched(small_corpus, tmp_path_factory):
    """2-rank torchrun trainings."""
    def train(run_dir: Path, extra: tuple[str, ...]) -> None:
        proc = torchrun(run_dir, overrides(*small_corpus, run_dir, *extra))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    return cached_runs(tmp_path_factory, "ds-run", train)


@pytest.fixture(scope="session")
def single_process(small_corpus, tmp_path_factory):
    """One-process runs of the plain engine, the reference the others must equal. They
    clip the full gradient, as DeepSpeed does inside its step (training.clip_on=auto
    clips the consumed norm of low-rank methods everywhere else)."""
    def train(run_dir: Path, extra: tuple[str, ...]) -> None:
        run(load_config("configs/tiny.yaml", overrides(*small_corpus, run_dir,
                                                       "training.clip_on=gradient", *extra)))

    return cached_runs(tmp_path_factory, "single", train)


def assert_same_run(got: Path, want: Path, tight: float, loose: float | None = None) -> None:
    """Losses, gradient norms and eval losses agree to ``tight`` up to step 4, where the first
    refresh after the initial one happens, and to ``loose`` after it: a top-r subspace with
    near-equal singular values at the cut turns with 1e-7 perturbations (the reductions sum
    in another order), as in the DDP equality test."""
    for a, b in zip(metric_rows(got), metric_rows(want), strict=True):
        assert a["step"] == b["step"]
        early = a["step"] <= 4 or loose is None
        for key in ("loss", "grad_norm", "eval_loss") if early else ("loss", "eval_loss"):
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=tight if early else loose), \
                    (a["step"], key)


# ------------------------------------------------------------------ training equals the reference


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_adamw_at_every_zero_stage_equals_ddp(launched, stage):
    ddp = launched("optim.name=adamw")
    got = launched("optim.name=adamw", "parallel.engine=deepspeed", zero(stage))
    assert_same_run(got, ddp, tight=1e-5)
    assert summary(got)["engine"] == f"deepspeed_zero{stage}"
    assert summary(got)["bytes_per_step"]["full_gradients"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lotus_equals_single_process_lotus(launched, single_process, stage):
    got = launched("parallel.engine=deepspeed", zero(stage))
    want = single_process()
    assert_same_run(got, want, tight=1e-5, loose=5e-3)
    refreshes = summary(got)["refreshes_per_matrix"]
    assert refreshes == summary(want)["refreshes_per_matrix"]  # every matrix, all ranks'
    assert len(refreshes) == 28 and set(refreshes.values()) == {4}


@pytest.mark.slow
def test_lotus_on_the_bf16_engine_tracks_single_process_bf16(launched, single_process):
    """bf16 weights with fp32 masters (DeepSpeed) vs bf16 autocast on fp32 weights: close, and
    learning, but not bitwise equal."""
    got = launched("parallel.engine=deepspeed", zero(0), "training.dtype=bf16")
    want = single_process("training.dtype=bf16")
    assert_same_run(got, want, tight=1e-2, loose=1e-2)
    assert summary(got)["refreshes_per_matrix"] == summary(want)["refreshes_per_matrix"]
    losses = [loss for _, loss in train_rows(got)]
    assert losses[-1] < losses[0] - 0.5


# ------------------------------------------------------------------ checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("sets", [("parallel.engine=deepspeed", zero(2)),
                                  ("optim.name=adamw", "parallel.engine=deepspeed", zero(3))],
                         ids=["lotus-zero2", "adamw-zero3"])
def test_resume_reproduces_the_uninterrupted_run(launched, small_corpus, tmp_path, sets):
    uninterrupted = launched(*sets)
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "ckpt" / "step-12")  # resume at step 6: refreshes lie ahead
    proc = torchrun(run_dir, overrides(*small_corpus, run_dir, *sets))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stdout
    assert (run_dir / "ckpt" / "step-12" / "deepspeed" / "layout.json").is_file()
    assert metric_rows(run_dir) == metric_rows(uninterrupted)


@pytest.mark.slow
def test_resume_on_another_world_size_fails_clearly(launched, small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(launched("parallel.engine=deepspeed", zero(2)), run_dir)
    shutil.rmtree(run_dir / "ckpt" / "step-12")
    proc = torchrun(run_dir, overrides(*small_corpus, run_dir, "parallel.engine=deepspeed",
                                       zero(2)), nproc=1)
    assert proc.returncode == 1
    assert "resume only on the same world size" in proc.stderr


# ------------------------------------------------------------------ the deepspeed launcher


@pytest.mark.slow
def test_the_deepspeed_cli_launches_the_trainer(launched, small_corpus, tmp_path):
    sets = overrides(*small_corpus, tmp_path, "parallel.engine=deepspeed", zero(1))
    deepspeed_cli = Path(sys.executable).with_name("deepspeed")
    with socket.socket() as sock:  # a free port: other jobs may hold DeepSpeed's 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([str(deepspeed_cli), "--num_gpus", "2", "--no_local_rank",
                           "--master_port", str(port), "--module", "launcher", "train",
                           "--config", "configs/tiny.yaml", *(f"--set={s}" for s in sets)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary(tmp_path)["world_size"] == 2
    assert train_rows(tmp_path) == train_rows(launched("parallel.engine=deepspeed", zero(1)))


# ------------------------------------------------------------------ refusals, before any step


def config(*extra: str):
    return load_config("configs/tiny.yaml", ["parallel.engine=deepspeed", *extra])


def test_batch_keys_are_filled_from_training():
    cfg = config(zero(1), "training.batch_size=16", "training.micro_batch_size=4",
                 "training.grad_clip=0.5", "training.dtype=bf16")
    ds = deepspeed_config(cfg, accum_steps=2, device=CPU.device)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (16, 4, 2, 0.5)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 1
    assert deepspeed_config(config(zero(1)), 1, CPU.device)["bf16"]["enabled"] is False


@pytest.mark.parametrize(("json_text", "message"), [
    ('{"train_batch_size": 64}', "train_batch_size=64 disagrees with training.batch_size"),
    ('{"bf16": {"enabled": true}}', "bf16.enabled=True disagrees with training.dtype"),
    ('{"optimizer": {"type": "Adam"}}', "the optimizer comes from optim.*"),
    ('{"scheduler": {"type": "WarmupLR"}}', "schedule comes from training.warmup_steps"),
    ('{"fp16": {"enabled": true}}', "use training.dtype=bf16"),
])
def test_a_json_that_contradicts_the_config_is_refused(tmp_path, json_text, message):
    path = tmp_path / "ds.json"
    path.write_text(json_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        deepspeed_config(config(f"parallel.deepspeed_config={path}"), 1, CPU.device)


@pytest.mark.parametrize(("sets", "message"), [
    (("optim.name=lotus", zero(3)), "use parallel.engine=fsdp"),
    (("optim.name=galore", zero(3)), "use parallel.engine=fsdp"),
    ((zero(1), "optim.per_layer=true"), "optim.per_layer=true"),
    ((zero(1), "training.clip_on=consumed"), "DeepSpeed clips the full gradient"),
    ((zero(1), "parallel.mixed_precision=bf16"), "set training.dtype=bf16"),
    ((zero(1), "parallel.check_consistency=true"), "use parallel.engine=ddp or fsdp"),
    (("optim.name=lotus",), "needs parallel.deepspeed_config"),
])
def test_unsupported_combinations_fail_before_anything_is_built(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_run(config(*sets), CPU.world_size, True, CPU.device)
    assert not dist.is_initialized()


def test_lotus_at_zero2_needs_the_world_size_to_divide_the_matrix_counts():
    """Tiny has 16 square and 12 MLP matrices: 3 ranks cannot own them whole."""
    cfg = config(zero(2), "training.batch_size=12", "training.micro_batch_size=4")
    with pytest.raises(ConfigError, match=r"not multiples of 3.*Use parallel\.engine=fsdp"):
        build_engine(cfg, TINY, dataclasses.replace(CPU, world_size=3),
                     plan_run(cfg, 3, True, CPU.device))
    assert not dist.is_initialized()


# ------------------------------------------------------------------ whole-matrix ownership


def lotus_optimizer() -> ZeroLotusAdamW:
    return ZeroLotusAdamW.from_lotus(build_optimizer(config(zero(2)).optim, build_model(TINY),
                                                     seed=0))


def test_regrouping_gives_each_rank_one_whole_matrix_and_keeps_refresh_seeds():
    opt = lotus_optimizer()
    index_before = dict(opt._index)
    opt.regroup_for_zero(4)
    projected = [g for g in opt.param_groups if "rank" in g]
    assert len(projected) == (16 + 12) // 4
    for g in projected:
        assert len(g["params"]) == 4 and len({p.numel() for p in g["params"]}) == 1
    assert opt._index == index_before  # the refresh generator of each matrix is unchanged


def test_regrouping_refuses_counts_the_world_size_does_not_divide():
    with pytest.raises(PartitionLayoutError, match="16 matrices of 16384 elements"):
        lotus_optimizer().regroup_for_zero(3)
