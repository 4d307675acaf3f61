"""The CUDA suite (``make test-gpu``, marker ``cuda``; skipped without a GPU).

Every engine x optimizer trains the tiny model for 20 steps under ``torchrun
--nproc_per_node=1`` with NCCL and bf16, evaluates, checkpoints at step 10 and resumes
from it into the same losses: one GPU runs the same collectives (NCCL, tensors on the
device) as a cluster job. The randomized SVD and the projections on CUDA equal the CPU
float64 result. Tests that need two GPUs skip with fewer.
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
from small_runs import metric_rows, small_run

from lotus_dist.projection import project, project_back, refresh_generator, rsvd_basis

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
STEPS = 20

#: engine -> overrides; each runs every optimizer (adamw, galore, lotus).
ENGINES = {
    "ddp": [],  # low-rank DDP for galore and lotus, torch DDP for adamw
    "ddp_full": ["parallel.lowrank_comm=false"],
    "fsdp_bf16": ["parallel.engine=fsdp", "parallel.mixed_precision=bf16"],
    "deepspeed_zero1": ["parallel.engine=deepspeed",
                        "parallel.deepspeed_config=configs/deepspeed/zero1.json"],
    "deepspeed_zero2": ["parallel.engine=deepspeed",
                        "parallel.deepspeed_config=configs/deepspeed/zero2.json"],
}
OPTIMIZERS = ("adamw", "galore", "lotus")
RESOLVED = {("ddp", "adamw"): "ddp", ("ddp", "galore"): "ddp_lowrank",
            ("ddp", "lotus"): "ddp_lowrank"}


def resolved(engine: str, optimizer: str) -> str:
    default = {"ddp_full": "ddp", "fsdp_bf16": "fsdp"}.get(engine, engine)
    return RESOLVED.get((engine, optimizer), default)


def torchrun(run_dir: Path, sets: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", "-m", "launcher", "train", "--config",
         "configs/tiny.yaml", *(f"--set={s}" for s in sets)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def sets(corpus: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    return small_run(corpus, tokenizer, run_dir, f"training.steps={STEPS}", "training.dtype=bf16",
                     "training.warmup_steps=2", "training.log_interval=1", "eval.interval=10",
                     "eval.batches=2", "checkpoint.interval=10", "checkpoint.keep_latest=0",
                     "optim.update_proj_gap=5", *extra)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_engine_trains_evaluates_and_resumes_on_one_gpu(small_corpus, tmp_path, engine,
                                                              optimizer):
    run_dir = tmp_path / "run"
    extra = [f"optim.name={optimizer}", *ENGINES[engine]]
    torchrun(run_dir, sets(*small_corpus, run_dir, *extra))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == resolved(engine, optimizer)
    assert summary["steps"] == STEPS and summary["final_eval_loss"] < summary["initial_eval_loss"]
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]
    assert rows[-1]["cuda_max_allocated_bytes"] > 0 and rows[-1]["mfu"] > 0  # an H100/H200 peak

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "ckpt" / f"step-{STEPS}")
    proc = torchrun(resumed, sets(*small_corpus, resumed, *extra))
    assert "resumed from step 10" in proc.stdout
    want = {r["step"]: r for r in metric_rows(run_dir)}
    for row in metric_rows(resumed):
        for key in ("loss", "eval_loss"):
            if key in row:  # bf16 kernels with atomics (embedding backward) are not bitwise
                assert row[key] == pytest.approx(want[row["step"]][key], rel=2e-2), row["step"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("engine", ["ddp", "fsdp_bf16", "deepspeed_zero2"])
def test_two_gpus_track_one_gpu(small_corpus, tmp_path, engine):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["optim.name=lotus", *ENGINES[engine]]
    torchrun(one, sets(*small_corpus, one, *extra))
    torchrun(two, sets(*small_corpus, two, *extra), nproc=2)
    a, b = metric_rows(one), metric_rows(two)
    for x, y in zip(a, b, strict=True):
        if "loss" in x:
            assert x["loss"] == pytest.approx(y["loss"], rel=2e-2), x["step"]


@pytest.mark.parametrize("shape", [(512, 256), (256, 768)])
def test_rsvd_and_projections_on_cuda_equal_the_cpu_float64_result(shape):
    """Test matrices are drawn on the CPU for every device, so the CUDA basis equals the
    CPU float64 one up to fp32 rounding, where the spectrum has a gap."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], 32, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 32, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -3, 32, dtype=torch.float64)
    grad = (u * s) @ v.T
    side = "right" if shape[0] >= shape[1] else "left"
    bases = {}
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        g = grad.to(device, dtype)
        bases[device] = rsvd_basis(g, 8, side, oversample=8, power_iters=2,
                                   generator=refresh_generator(0, 0, 0))
    cpu, cuda = bases["cpu"], bases["cuda"].double().cpu()
    # same subspace: the projector difference, not the signs of the columns
    assert (cpu @ cpu.T - cuda @ cuda.T).norm() < 1e-4
    r_cpu = project(grad, cpu, side)
    r_cuda = project(grad.cuda().float(), bases["cuda"], side).double().cpu()
    back_cpu = project_back(r_cpu, cpu, side)
    back_cuda = project_back(r_cuda.cuda().float(), bases["cuda"], side).double().cpu()
    assert (back_cpu - back_cuda).norm() / back_cpu.norm() < 1e-4


@pytest.mark.parametrize("engine", ["ddp", "fsdp_bf16"])
def test_projected_backward_trains_on_one_gpu_like_forming_the_gradient(small_corpus, tmp_path,
                                                                         engine):
    """bf16 on CUDA with NCCL: R from the activations (low-rank DDP's buckets, FSDP's
    reduce-scatter of R) tracks the run that forms G and projects it."""
    runs = {}
    for pb in (False, True):
        run_dir = tmp_path / f"pb-{pb}"
        extra = ["optim.name=lotus", *ENGINES[engine],
                 f"optim.projected_backward={str(pb).lower()}"]
        torchrun(run_dir, sets(*small_corpus, run_dir, *extra))
        runs[pb] = [r for r in metric_rows(run_dir) if "loss" in r]
    for x, y in zip(runs[False], runs[True], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-2), x["step"]
        assert (x["refreshes/self_attn"], x["refreshes/mlp"]) == \
            (y["refreshes/self_attn"], y["refreshes/mlp"]), x["step"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_projected_linear_on_cuda_under_bf16_autocast(side):
    """The backward's R equals project(G) of the same bf16 matmuls, handed on in fp32."""
    from lotus_dist.projected_linear import install_projected_backward

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 512, bias=False).cuda()
    basis = torch.linalg.qr(torch.randn(256 if side == "right" else 512, 32,
                                        device="cuda")).Q
    x = torch.randn(4, 64, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ((layer(x).float()) ** 2).sum().backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    site = install_projected_backward(layer, [layer.weight],
                                      lambda w: (lambda: basis, side, 32))[layer.weight]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ((layer(x).float()) ** 2).sum().backward()
    r = site.take()
    assert layer.weight.grad is None and r.dtype == torch.float32 and r.is_cuda
    expected = project(grad, basis, side)
    assert (r - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("engine", ["ddp", "fsdp_bf16"])
def test_rso_trains_evaluates_and_resumes_on_one_gpu(small_corpus, tmp_path, engine):
    """RSO under NCCL: B's gradients all-reduced (DDP) or reduce-scattered (FSDP, bf16
    gathers), W merged every 5 steps, and a resume from step 10 tracks the run."""
    run_dir = tmp_path / "run"
    extra = ["optim.name=rso", *ENGINES[engine]]
    torchrun(run_dir, sets(*small_corpus, run_dir, *extra))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == ("ddp" if engine == "ddp" else "fsdp")
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert set(summary["refreshes_per_matrix"].values()) == {STEPS // 5}
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "ckpt" / f"step-{STEPS}")
    assert "resumed from step 10" in torchrun(resumed, sets(*small_corpus, resumed,
                                                            *extra)).stdout
    want = {r["step"]: r for r in metric_rows(run_dir)}
    for row in metric_rows(resumed):
        if "loss" in row:
            assert row["loss"] == pytest.approx(want[row["step"]]["loss"], rel=2e-2)


def test_an_rso_block_saves_less_on_cuda_under_bf16_autocast():
    """The CUDA attention kernels and bf16 casts differ from the CPU's; the saving must
    still be there (the CPU test checks the exact formula)."""
    import copy

    from launcher.bench.activations import saved_bytes
    from lotus_dist.model import MODEL_SIZES, Block
    from lotus_dist.rso import install_rso

    cfg = MODEL_SIZES["60m"]
    torch.manual_seed(0)
    plain = Block(cfg).cuda()
    for p in plain.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    rso = copy.deepcopy(plain)
    install_rso(rso, 128, ["self_attn", "mlp"])

    def saved(block: torch.nn.Module) -> int:
        x = torch.randn(4, 256, cfg.dim, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return saved_bytes(block, cfg, x)

    before, after = saved(plain), saved(rso)
    print(f"60m block, 4 x 256 tokens, bf16 autocast: {before} -> {after} bytes "
          f"({after / before:.3f})")
    assert after < 0.9 * before
