"""The projected linear: its backward yields R = project(G) from activations, with the
usual input gradient, and never forms G outside refresh steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from small_runs import metric_rows, small_run
from test_fp64_equivalence import torchrun
from test_fsdp_trainer import checkpoint_tensors
from torch import nn

from launcher.config import load_config
from launcher.train import run
from lotus_dist.projected_linear import ProjectionSite, install_projected_backward
from lotus_dist.projection import project, random_basis, refresh_generator

M, N, RANK = 12, 20, 4


def _layer_and_data(dtype=torch.float64, micro_batches: int = 3):
    torch.manual_seed(0)
    layer = nn.Linear(N, M, bias=False).to(dtype)
    xs = [torch.randn(2, 5, N, dtype=dtype, requires_grad=True) for _ in range(micro_batches)]
    targets = [torch.randn(2, 5, M, dtype=dtype) for _ in range(micro_batches)]
    return layer, xs, targets


def _reference(dtype=torch.float64):
    """G and dx of a plain linear over the same micro-batches."""
    layer, xs, targets = _layer_and_data(dtype)
    for x, t in zip(xs, targets):
        ((layer(x) - t) ** 2).sum().backward()
    return layer.weight.grad.clone(), [x.grad.clone() for x in xs]


def _projected(side: str | None, dtype=torch.float64):
    layer, xs, targets = _layer_and_data(dtype)
    d = N if side == "right" else M
    basis = random_basis(d, RANK, refresh_generator(0, 0, 0), dtype=dtype)
    delivered = []
    sites = install_projected_backward(
        layer, [layer.weight], lambda w: None if side is None else (lambda: basis, side, RANK))
    site = sites[layer.weight]
    site.on_ready = lambda s, r: delivered.append(r.clone())
    for x, t in zip(xs, targets):
        ((layer(x) - t) ** 2).sum().backward()
    return layer, site, basis, [x.grad for x in xs], delivered


@pytest.mark.parametrize("side", ["left", "right"])
def test_backward_gives_the_projection_of_the_whole_gradient(side):
    grad, dxs = _reference()
    layer, site, basis, proj_dxs, delivered = _projected(side)
    assert layer.weight.grad is None  # G was never formed
    expected = project(grad, basis, side)
    assert len(delivered) == 3  # the running sum, after every micro-batch
    torch.testing.assert_close(delivered[-1], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(site.take(), expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(dxs, proj_dxs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert site.take() is None  # the next step starts empty


def test_a_refresh_step_forms_the_whole_gradient():
    grad, _ = _reference()
    layer, site, _, _, delivered = _projected(None)
    torch.testing.assert_close(layer.weight.grad, grad, rtol=1e-13, atol=1e-13)
    assert delivered == [] and site.take() is None


def test_right_projection_keeps_x_q_instead_of_x():
    """Saved bytes of one forward: x Q (T x r) and the weight, instead of x (T x n)."""
    def saved_bytes(side):
        layer, xs, _ = _layer_and_data(torch.float32, 1)
        basis = random_basis(N if side == "right" else M, RANK, refresh_generator(0, 0, 0))
        install_projected_backward(layer, [layer.weight], lambda w: (lambda: basis, side, RANK))
        total = [0]

        def pack(t):
            if t.data_ptr() != layer.weight.data_ptr():
                total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(xs[0])
        return total[0]

    tokens = 2 * 5
    assert saved_bytes("right") == tokens * RANK * 4  # x Q
    assert saved_bytes("left") == tokens * N * 4  # x (P is gathered again in backward)


def test_autocast_runs_the_matmuls_in_bf16_and_hands_on_fp32():
    grad, _ = _reference(torch.float32)
    layer, xs, targets = _layer_and_data(torch.float32)
    basis = random_basis(N, RANK, refresh_generator(0, 0, 0))
    site = install_projected_backward(layer, [layer.weight],
                                      lambda w: (lambda: basis, "right", RANK))[layer.weight]
    for x, t in zip(xs, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        ((y.float() - t) ** 2).sum().backward()
        assert x.grad.dtype == torch.float32
    r = site.take()
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, project(grad, basis, "right"), rtol=0.05, atol=0.05)


def test_a_wrong_shape_or_device_fails_loudly():
    layer = _layer_and_data()[0]
    basis = random_basis(N, RANK, refresh_generator(0, 0, 0), dtype=torch.float64)
    site = ProjectionSite("layer.weight", layer.weight, lambda: (lambda: basis, "right", RANK))
    site.projection()
    with pytest.raises(ValueError, match=r"layer\.weight: R of shape \(4, 20\) on cpu, exp"):
        site.accumulate(torch.zeros(RANK, N, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(12, 4\) on meta, expected \(12, 4\) on cpu"):
        site.accumulate(torch.zeros(M, RANK, dtype=torch.float64, device="meta"))


def test_only_bias_free_linears_of_the_model_can_project():
    with pytest.raises(ValueError, match="has a bias"):
        layer = nn.Linear(4, 3)
        install_projected_backward(layer, [layer.weight], lambda w: None)
    with pytest.raises(ValueError, match=r"not the weight of an nn\.Linear"):
        install_projected_backward(nn.Linear(4, 3, bias=False), [nn.Parameter(torch.ones(2, 2))],
                                   lambda w: None)


# ----------------------------------------------------------------- in the trainer, fp64

STEPS = 30


LOTUS = ["optim.name=lotus", "optim.gamma=0.5", "optim.verify_gap=5"]


def _fp64_sets(small_corpus, run_dir, method: list[str], *extra: str) -> list[str]:
    """Batch 12 in micro-batches of 2: 6, 3 and 2 micro-batches per rank on 1, 2, 3."""
    return small_run(
        *small_corpus, run_dir, "training.dtype=fp64", "training.batch_size=12",
        "training.micro_batch_size=2", f"training.steps={STEPS}", "training.warmup_steps=5",
        "training.log_interval=1", "optim.lr=0.01", "eval.interval=0", "eval.batches=1",
        f"checkpoint.interval={STEPS}", "checkpoint.keep_latest=1", *method, *extra)


def _fp64_run(small_corpus, run_dir, method: list[str], *extra: str):
    run(load_config("configs/tiny.yaml", _fp64_sets(small_corpus, run_dir, method, *extra)))


def _assert_same_run(got: Path, ref: Path) -> None:
    """Same losses (1e-9), refresh steps and final weights (1e-9) in fp64."""
    off, on = metric_rows(ref), metric_rows(got)
    off_loss = [r["loss"] for r in off if "loss" in r]
    on_loss = [r["loss"] for r in on if "loss" in r]
    assert len(on_loss) == STEPS
    assert on_loss == pytest.approx(off_loss, rel=1e-9, abs=0)
    refreshes = [(r["refreshes/self_attn"], r["refreshes/mlp"]) for r in off if "loss" in r]
    assert [(r["refreshes/self_attn"], r["refreshes/mlp"]) for r in on if "loss" in r] == \
        refreshes
    assert refreshes[-1][0] > 2 * refreshes[0][0]  # several refreshes after the first
    w_off, w_on = checkpoint_tensors(ref, STEPS), checkpoint_tensors(got, STEPS)
    for key in (k for k in w_off if k.startswith("model.")):
        torch.testing.assert_close(w_on[key], w_off[key], rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("method", [LOTUS, ["optim.name=galore", "optim.update_proj_gap=7"]],
                         ids=["lotus", "galore"])
def test_projected_backward_trains_the_same_run_in_fp64(small_corpus, tmp_path, monkeypatch,
                                                        method):
    """Three micro-batches per step, clipping on the consumed norm: the same losses,
    refreshes and weights as forming G and projecting it."""
    _fp64_run(small_corpus, tmp_path / "off", method)
    calls = []
    accumulate = ProjectionSite.accumulate
    monkeypatch.setattr(ProjectionSite, "accumulate",
                        lambda self, r: calls.append(self.name) or accumulate(self, r))
    _fp64_run(small_corpus, tmp_path / "on", method, "optim.projected_backward=true")
    matrices = 4 * 7  # tiny: 4 layers of q, k, v, o, gate, up, down
    # six micro-batches on every step but the refresh ones (all of step 1's)
    assert matrices * 6 * (STEPS // 2) < len(calls) < matrices * 6 * STEPS
    _assert_same_run(tmp_path / "on", tmp_path / "off")


@pytest.mark.parametrize("world", [2, 3])
def test_low_rank_ddp_ranks_equal_one_process_in_fp64(small_corpus, tmp_path, world):
    """No full gradient of a projected weight crosses the wire or is formed outside
    refresh steps, and 2 or 3 ranks still train the one-process run."""
    _fp64_run(small_corpus, tmp_path / "ref", LOTUS)
    torchrun(world, _fp64_sets(small_corpus, tmp_path / "ddp", LOTUS,
                               "optim.projected_backward=true"))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["engine"] == "ddp_lowrank"
    _assert_same_run(tmp_path / "ddp", tmp_path / "ref")


@pytest.mark.parametrize(("world", "accumulation"),
                         [(2, "sharded"), (3, "sharded"), (2, "unsharded")])
def test_fsdp_ranks_equal_one_process_in_fp64(small_corpus, tmp_path, world, accumulation):
    """Projected weights skip FSDP's reduce-scatter; R is reduce-scattered to each rank's
    shard every micro-batch (sharded) or summed whole and all-reduced once (unsharded);
    3 ranks: the tiny model's dims split unevenly, down_proj on dim 0."""
    _fp64_run(small_corpus, tmp_path / "ref", LOTUS)
    torchrun(world, _fp64_sets(small_corpus, tmp_path / "fsdp", LOTUS, "parallel.engine=fsdp",
                               "optim.projected_backward=true",
                               f"parallel.fsdp_grad_accumulation={accumulation}"))
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["engine"] == "fsdp"
    _assert_same_run(tmp_path / "fsdp", tmp_path / "ref")
    # reduce-scatters (fp64, 6 / world micro-batches a step): the projected weights only
    # on their refresh steps, so well under the whole model's every micro-batch
    sent = summary["bytes_per_step"]
    whole = 6 // world * 8 * sum(t.numel() for k, t in checkpoint_tensors(
        tmp_path / "fsdp", STEPS).items() if k.startswith("model."))
    assert 0 < sent["full_gradients"] < 0.5 * whole
    assert sent["lowrank_gradients"] > 0
