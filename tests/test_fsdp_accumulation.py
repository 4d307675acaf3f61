"""FSDP gradient accumulation (``parallel.fsdp_grad_accumulation``): sharded (the default)
reduce-scatters every micro-batch and never holds a whole gradient; unsharded sums whole
gradients locally and reduce-scatters once. Both train the same run (fp64, 2 ranks, 6
micro-batches each), and the bytes each reports (``comm_bytes_per_step``, ``bench
memory``) follow from the mode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from small_runs import small_run
from test_fsdp_trainer import checkpoint_tensors, spawn
from torch.distributed.tensor import DTensor

from launcher.bench.memory import (
    METHODS,
    derived_layout,
    measure,
    method_config,
    model_config,
    per_rank_usage,
)
from launcher.config import load_config
from launcher.distributed import DistInfo
from launcher.engines.fsdp import build_fsdp_engine
from lotus_dist.model import build_model_on_meta

STEPS = 12
BY_LABEL = {m.label: m for m in METHODS}


def _tiny(*sets: str):
    cfg = load_config("configs/tiny.yaml", ["parallel.engine=fsdp", "training.dtype=fp64",
                                            *sets])
    return cfg, model_config(cfg)


def _numel(model_cfg) -> tuple[int, int]:
    """(all parameters, the final norm and head: the unit FSDP keeps gathered)."""
    model = build_model_on_meta(model_cfg)
    head = sum(p.numel() for m in (model.norm, model.lm_head) for p in m.parameters())
    return sum(p.numel() for p in model.parameters()), head


@pytest.mark.parametrize("mode", ["sharded", "unsharded"])
def test_non_final_micro_batches_keep_sharded_gradients_only_when_sharded(mode):
    """After the first of 3 micro-batches on a fake 2-rank group (collectives do
    nothing, shapes are real): sharded accumulation has already reduce-scattered into
    each parameter's sharded ``.grad``; unsharded has no sharded gradient yet (FSDP
    keeps the whole one on the unsharded parameter). Bytes: one reduce-scatter per
    micro-batch, or one per step, of fp64 gradients."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg, model_cfg = _tiny(f"parallel.fsdp_grad_accumulation={mode}")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        engine = build_fsdp_engine(cfg, model_cfg, DistInfo(0, 2, 0, torch.device("cpu")),
                                   accum_steps=3)
        tokens = torch.randint(0, model_cfg.vocab_size, (2, 16))
        for i in range(3):
            with engine.micro_batch(last=i == 2):
                engine.backward(engine.model(tokens).mean() / 3)
            grads = [p.grad for p in engine.model.parameters()]
            if i == 0:
                if mode == "sharded":
                    assert all(isinstance(g, DTensor) and g.to_local().shape == p.to_local().shape
                               for g, p in zip(grads, engine.model.parameters()))
                else:
                    assert all(g is None for g in grads)
        assert all(isinstance(g, DTensor) for g in grads)
        sent = engine.comm_bytes_per_step()
    finally:
        dist.destroy_process_group()
    numel, head = _numel(model_cfg)
    assert sent["full_gradients"] == (3 if mode == "sharded" else 1) * numel * 8
    assert sent["param_allgathers"] == 3 * (2 * numel - head) * 8  # fp64 weights


def test_bench_memory_shows_both_modes_gradient_bytes():
    """7b at W=8: the default keeps 1/8 of the gradients per rank; unsharded
    accumulation keeps all of them (about 27 GB) on every rank, at any W."""
    layouts = derived_layout(method_config("7b", BY_LABEL["lotus"])).values()
    whole = sum(math.prod(lay.shape) * lay.itemsize for lay in layouts)
    assert whole == pytest.approx(27e9, rel=0.01)
    usage, _ = measure(["7b"], [BY_LABEL["lotus"]], ["ddp", "fsdp"], [8, 64])
    for world in (8, 64):
        fsdp = usage["7b", "fsdp", world, "lotus"]
        assert fsdp.grads == pytest.approx(whole / world, rel=0.01)
        assert fsdp.grads_unsharded_accum == whole
        assert usage["7b", "ddp", world, "lotus"].grads_unsharded_accum is None
    per_layer = per_rank_usage(layouts, per_layer=True, engine="fsdp", world=1)
    assert per_layer.grads_unsharded_accum is None  # per_layer runs in one process only


def _sets(corpus: Path, tokenizer: Path, run_dir: Path, mode: str) -> list[str]:
    """fp64, 24 sequences per step in micro-batches of 2: 6 per rank on 2 ranks; Lotus
    refreshing adaptively, gradients clipped on their global norm."""
    return small_run(corpus, tokenizer, run_dir, "parallel.engine=fsdp", "training.dtype=fp64",
                     "training.batch_size=24", "training.micro_batch_size=2",
                     f"training.steps={STEPS}", "training.warmup_steps=2",
                     "training.log_interval=1", "training.grad_clip=1.0",
                     "training.clip_on=gradient", "optim.lr=0.01", "optim.name=lotus",
                     "optim.gamma=0.5", "optim.verify_gap=3", "eval.interval=0",
                     "eval.batches=1", "checkpoint.interval=0", "checkpoint.keep_latest=0",
                     f"parallel.fsdp_grad_accumulation={mode}")


@pytest.mark.slow
def test_sharded_and_unsharded_accumulation_train_the_same_run_in_fp64(small_corpus, tmp_path):
    runs = {mode: tmp_path / mode for mode in ("sharded", "unsharded")}
    spawn(2, [_sets(*small_corpus, run_dir, mode) for mode, run_dir in runs.items()])

    def rows(run_dir: Path) -> list[dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    got, ref = rows(runs["sharded"]), rows(runs["unsharded"])
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for g, r in zip(got, ref):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(r[key], rel=1e-9, abs=0), (g["step"], key)
        assert (g["refreshes/self_attn"], g["refreshes/mlp"]) == \
            (r["refreshes/self_attn"], r["refreshes/mlp"])
    assert sum(ref[-1][k] for k in ("refreshes/self_attn", "refreshes/mlp")) > 0
    got_w, ref_w = checkpoint_tensors(runs["sharded"], STEPS), \
        checkpoint_tensors(runs["unsharded"], STEPS)
    for key in (k for k in ref_w if k.startswith("model.")):
        assert (got_w[key] - ref_w[key]).norm() <= 1e-9 * ref_w[key].norm(), key
    sent = {mode: json.loads((d / "summary.json").read_text())["bytes_per_step"]
            for mode, d in runs.items()}
    assert sent["sharded"]["full_gradients"] == 6 * sent["unsharded"]["full_gradients"]
