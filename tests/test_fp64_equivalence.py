"""N ranks equal 1 rank in float64 (``training.dtype=fp64``), where rounding cannot hide
a real difference: 60 steps with a dozen adaptive refreshes per matrix, on every engine
(low-rank and plain DDP, FSDP with even and uneven shards, DeepSpeed ZeRO-1/2), 2, 3 and
4 ranks, and every projection (Lotus's rSVD, GaLore's SVD, GrassWalk's geodesic steps,
GrassJump's random bases), and RSO (its B's all-reduced by DDP, reduce-scattered by FSDP,
merged into W every 7 steps, so the last step is mid-period; a refresh is a new
subspace). Losses, refresh steps and final weights agree to 1e-9; under
DeepSpeed, whose ZeRO-1/2 optimizer keeps fp32 master weights even for an fp64 model, to
1e-6 (its updates are rounded to fp32), with the same refresh steps (its weights,
in DeepSpeed's own checkpoint format, are not compared here).

The fp32 tests elsewhere only show that nothing is grossly wrong; these would catch a
reduction that averages the wrong thing, a decision one rank takes alone, a shard
boundary that drops a row, or an optimizer default that differs between engines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small_runs import small_run
from test_fsdp_trainer import checkpoint_tensors

from launcher.config import load_config
from launcher.train import run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
#: Lotus: adaptive switching verified every 5 steps, about 12 refreshes per matrix in 60
#: steps, each decided by a threshold (not forced by gamma > 1); the others refresh on
#: their fixed schedule, every 10 steps.
METHODS = {
    "lotus": ["optim.name=lotus", "optim.gamma=0.5", "optim.verify_gap=5"],
    "galore": ["optim.name=galore", "optim.update_proj_gap=10"],
    "grasswalk": ["optim.name=grasswalk", "optim.update_proj_gap=10"],
    "grassjump": ["optim.name=grassjump", "optim.update_proj_gap=10"],
    # RSO's own lr (its preset's): at 10x it trains chaotically on tiny, and rounding
    # grows from 1e-16 to 3e-9 in 60 steps (2 ranks against 1, measured)
    "rso": ["optim.name=rso", "optim.update_proj_gap=7", "optim.proximal=0.5",
            "optim.lr=0.001"],
}
DS = "parallel.engine=deepspeed"


def zero(stage: int) -> list[str]:
    """DeepSpeed clips on a norm it computes itself (rounded through fp32), so its runs,
    and their reference, do not clip."""
    return [DS, f"parallel.deepspeed_config=configs/deepspeed/zero{stage}.json",
            "training.grad_clip=0"]


#: (method, ranks, engine overrides); the key's middle part is the engine that must run
#: (under torchrun the named engine runs at one rank too). Batch 24 in micro-batches of
#: 2: 12, 6, 4 and 3 micro-batches per rank on 1, 2, 3 and 4 ranks. The tiny model's
#: dims (128, 352) split unevenly over 3 ranks.
CASES = {
    "lotus-ddp_lowrank-1": ("lotus", 1, []),
    "lotus-fsdp-1": ("lotus", 1, ["parallel.engine=fsdp"]),
    "lotus-ddp_lowrank-2": ("lotus", 2, []),
    "lotus-ddp_lowrank-3": ("lotus", 3, []),
    "lotus-ddp-4": ("lotus", 4, ["parallel.lowrank_comm=false"]),
    "lotus-fsdp-3": ("lotus", 3, ["parallel.engine=fsdp"]),
    "lotus-fsdp-4": ("lotus", 4, ["parallel.engine=fsdp"]),
    "lotus-zero1-2": ("lotus", 2, zero(1)),
    "lotus-zero2-4": ("lotus", 4, zero(2)),
    "galore-ddp_lowrank-2": ("galore", 2, []),
    "galore-fsdp-2": ("galore", 2, ["parallel.engine=fsdp"]),
    "galore-fsdp-3": ("galore", 3, ["parallel.engine=fsdp"]),
    "grasswalk-ddp-3": ("grasswalk", 3, []),
    "grassjump-ddp-2": ("grassjump", 2, []),
    "rso-ddp-2": ("rso", 2, []),
    "rso-ddp-3": ("rso", 3, []),
    "rso-fsdp-2": ("rso", 2, ["parallel.engine=fsdp"]),
    "rso-fsdp-3": ("rso", 3, ["parallel.engine=fsdp"]),
}


def sets(corpus: Path, tokenizer: Path, run_dir: Path, method: str, *extra: str) -> list[str]:
    return small_run(corpus, tokenizer, run_dir, "training.dtype=fp64", "training.batch_size=24",
                     "training.micro_batch_size=2", f"training.steps={STEPS}",
                     "training.warmup_steps=5", "training.log_interval=1", "optim.lr=0.01",
                     "eval.interval=0", "eval.batches=1", "checkpoint.interval=0",
                     "checkpoint.keep_latest=0", *METHODS[method], *extra)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """reference(method, unclipped) -> the one-process run (without clipping for the
    DeepSpeed cases)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(method: str, unclipped: bool) -> Path:
        if (method, unclipped) not in cache:
            run_dir = tmp_path_factory.mktemp(f"fp64-{method}-1")
            clip = ["training.grad_clip=0"] if unclipped else []
            run(load_config("configs/tiny.yaml", sets(*small_corpus, run_dir, method, *clip)))
            cache[method, unclipped] = run_dir
        return cache[method, unclipped]

    return get


def torchrun(nproc: int, overrides: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "launcher", "train",
                           "--config", "configs/tiny.yaml", *(f"--set={s}" for s in overrides)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def rows(run_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in row]


@pytest.mark.parametrize("case", list(CASES))
def test_n_ranks_equal_one_rank_in_fp64(small_corpus, reference, tmp_path, case):
    method, nproc, engine = CASES[case]
    ref = reference(method, unclipped=DS in engine)
    torchrun(nproc, sets(*small_corpus, tmp_path, method, *engine))
    expected = case.split("-")[1]
    expected = f"deepspeed_{expected}" if expected.startswith("zero") else expected
    assert json.loads((tmp_path / "summary.json").read_text())["engine"] == expected
    got_rows, ref_rows = rows(tmp_path), rows(ref)
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    # ZeRO-1/2 keep fp32 master weights whatever the model dtype: their updates are
    # rounded to fp32, so DeepSpeed equals one process to fp32 rounding, not to 1e-9.
    tol = 1e-6 if DS in engine else 1e-9
    for g, r in zip(got_rows, ref_rows):
        assert g["loss"] == pytest.approx(r["loss"], rel=tol, abs=0), g["step"]
    refreshes = [(r["refreshes/self_attn"], r["refreshes/mlp"]) for r in ref_rows]
    assert [(g["refreshes/self_attn"], g["refreshes/mlp"]) for g in got_rows] == refreshes
    per_matrix = json.loads((ref / "summary.json").read_text())["refreshes_per_matrix"]
    assert min(per_matrix.values()) >= 4, per_matrix  # several refreshes, each one compared
    got_summary = json.loads((tmp_path / "summary.json").read_text())
    assert got_summary["refreshes_per_matrix"] == per_matrix
    if DS in engine:
        return  # DeepSpeed writes its own checkpoint format; tests/test_deepspeed.py
        # checks that it resumes into the same run
    got_w, ref_w = checkpoint_tensors(tmp_path, STEPS), checkpoint_tensors(ref, STEPS)
    weights = [k for k in ref_w if k.startswith("model.")]
    assert weights and all(ref_w[k].dtype == torch.float64 for k in weights)
    for key in weights:
        err = (got_w[key] - ref_w[key]).norm() / ref_w[key].norm()
        assert err <= tol, (key, float(err))


def test_rso_fsdp_run_resumes_mid_period_on_another_world_size(small_corpus, tmp_path):
    """2 FSDP ranks save at step 5 (5 steps into a 7-step subspace: B, its moments and
    the period counters are all live); 3 ranks resume from there and finish the run the
    2-rank job finished, losses and weights to 1e-9."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    extra = ["parallel.engine=fsdp", "training.steps=12", "checkpoint.interval=5"]
    torchrun(2, sets(*small_corpus, whole, "rso", *extra))
    shutil.copytree(whole, resumed)
    for step in (10, 12):
        shutil.rmtree(resumed / "ckpt" / f"step-{step}")
    torchrun(3, sets(*small_corpus, resumed, "rso", *extra))
    want = {r["step"]: r["loss"] for r in rows(whole)}
    got = rows(resumed)
    assert [r["step"] for r in got] == list(range(1, 13))
    for r in got:
        assert r["loss"] == pytest.approx(want[r["step"]], rel=1e-9, abs=0), r["step"]
    got_w, ref_w = checkpoint_tensors(resumed, 12), checkpoint_tensors(whole, 12)
    for key in [k for k in ref_w if k.startswith("model.")]:
        err = (got_w[key] - ref_w[key]).norm() / ref_w[key].norm().clamp_min(1e-300)
        assert err <= 1e-9, (key, float(err))
