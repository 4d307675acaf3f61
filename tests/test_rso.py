"""RSO (``lotus_dist.rso``): B's gradient is the projection of the dense dW, saved
activations fall as the paper's formula says, the optimizer is Adam on the subproblem
with its proximal term, and the period boundary merges, resets and redraws exactly."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from launcher.bench.activations import saved_bytes
from lotus_dist.model import MODEL_SIZES, Block, build_model
from lotus_dist.rso import (
    RSOAdamW,
    draw_projection,
    fold_rso,
    install_rso,
    merge_period,
    projections,
    rso_layers,
    start_period,
)

CFG = replace(MODEL_SIZES["tiny"], vocab_size=64, max_seq_len=16)
TARGETS = ["self_attn", "mlp"]


def rso_model(rank: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64):
    model = build_model(CFG, seed=seed, dtype=dtype)
    install_rso(model, rank, TARGETS, seed)  # period 0: P drawn, B zero
    return model


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def plain_twin(model):
    """A plain model whose W is the RSO model's W + B P^T: the function RSO computes."""
    twin = copy.deepcopy(model)
    fold_rso(twin)
    return twin


def test_b_gradient_is_the_projection_of_the_dense_weight_gradient():
    model = rso_model()
    with torch.no_grad():
        for _, linear, _ in rso_layers(model):  # a period under way: B is not zero
            linear.rso_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    twin = plain_twin(model)
    tokens = torch.randint(CFG.vocab_size, (3, 13), generator=torch.Generator().manual_seed(2))
    loss, ref = loss_of(model, tokens), loss_of(twin, tokens)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-13)
    loss.backward()
    ref.backward()
    twin_params = dict(twin.named_parameters())
    for name, linear, proj in rso_layers(model):
        assert linear.weight.grad is None  # W is frozen: no dense dW is ever formed
        dense = twin_params[f"{name}.weight"].grad  # G = dL/dW at W + B P^T
        torch.testing.assert_close(linear.rso_b.grad, dense @ proj.p, rtol=1e-11, atol=1e-13)
    for name, p in model.named_parameters():  # embeddings, norms, head: the same gradients
        if p.requires_grad and not name.endswith("rso_b"):
            torch.testing.assert_close(p.grad, twin_params[name].grad, rtol=1e-11, atol=1e-13)


def test_the_linears_that_read_one_input_share_its_projection():
    model = rso_model()
    groups = {name: proj.members for name, proj in projections(model)}
    assert groups["layers.0.self_attn.rso_q_proj"] == ("q_proj", "k_proj", "v_proj")
    assert groups["layers.0.self_attn.rso_o_proj"] == ("o_proj",)
    assert groups["layers.0.mlp.rso_gate_proj"] == ("gate_proj", "up_proj")
    assert groups["layers.0.mlp.rso_down_proj"] == ("down_proj",)
    assert len(groups) == 4 * CFG.n_layers
    p = dict(projections(model))["layers.1.mlp.rso_down_proj"].p
    assert p.shape == (CFG.intermediate_size, 8)
    torch.testing.assert_close(p, draw_projection(0, "layers.1.mlp.rso_down_proj", 0,
                                                  (CFG.intermediate_size, 8)).double())


@pytest.mark.parametrize("rank", [4, 16])
def test_saved_activations_fall_as_the_papers_formula_says(rank):
    """Saved bytes per block, measured with saved-tensor hooks (each storage once, the
    block's parameters, buffers and rotary tables left out). RSO keeps x P (s x r)
    instead of the input x of each of a block's four linear
    inputs: 15bsn + 2bs^2 -> 8bsn + 4bsr + 2bs^2 in the paper, whose MLP is 4n wide. Here
    the attention output (o_proj's input) is also saved by scaled_dot_product_attention's
    own backward, whatever the method, so three inputs are freed: s (2n + I) elements
    become 4 s r (docs/algorithm.md)."""
    torch.manual_seed(0)
    plain = Block(CFG).float()
    for p in plain.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    rso = copy.deepcopy(plain)
    install_rso(rso, rank, TARGETS)
    batch, seq = 2, 16
    x = torch.randn(batch, seq, CFG.dim, requires_grad=True)
    before, after = saved_bytes(plain, CFG, x), saved_bytes(rso, CFG, x)
    s, n, inter, fp32 = batch * seq, CFG.dim, CFG.intermediate_size, 4
    assert before - after == s * (2 * n + inter - 4 * rank) * fp32


def test_with_activation_checkpointing_a_block_saves_only_its_input():
    """With activation checkpointing a block saves only its input, for every method: the
    saving above is then gone (the memory benchmark shows both)."""
    from torch.distributed._composable import checkpoint

    block = Block(CFG).float()
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    install_rso(block, 8, TARGETS)
    checkpoint(block)
    x = torch.randn(2, 16, CFG.dim, requires_grad=True)
    assert saved_bytes(block, CFG, x) == x.numel() * 4


def adam_reference(model, tokens_list, lr, betas, eps, weight_decay, proximal, period_steps,
                   seed):
    """RSO written out by hand: torch.optim.Adam on each B with grad + proximal B, AdamW on
    the rest, and at each period end W += B P^T, P redrawn, fresh Adam state for B."""
    bs = [linear.rso_b for _, linear, _ in rso_layers(model)]
    ids = {id(b) for b in bs}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    other = torch.optim.AdamW(plain, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    inner = torch.optim.Adam(bs, lr=lr, betas=betas, eps=eps)
    losses, period = [], 0
    for i, tokens in enumerate(tokens_list, start=1):
        loss = loss_of(model, tokens)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for b in bs:
                b.grad.add_(b, alpha=proximal)
        other.step()
        inner.step()
        model.zero_grad(set_to_none=True)
        if i % period_steps == 0:
            merge_period(model)
            period += 1
            start_period(model, seed, period)
            inner = torch.optim.Adam(bs, lr=lr, betas=betas, eps=eps)
    return losses


@pytest.mark.parametrize("proximal", [0.0, 0.5])
def test_rso_adamw_is_adam_on_the_subproblem_and_merges_every_period(proximal):
    hyper = {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    ours, ref = rso_model(seed=3), rso_model(seed=3)
    gen = torch.Generator().manual_seed(4)
    tokens = [torch.randint(CFG.vocab_size, (2, 9), generator=gen) for _ in range(11)]
    opt = RSOAdamW(ours, **hyper, period_steps=4, proximal=proximal, seed=3)
    losses = []
    for t in tokens:
        loss = loss_of(ours, t)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    expected = adam_reference(ref, tokens, **hyper, proximal=proximal, period_steps=4, seed=3)
    assert losses == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(dict(ours.state_dict()), dict(ref.state_dict()),
                               rtol=1e-11, atol=1e-14)
    assert opt.rso_group["period"] == 2 and opt.rso_group["period_step"] == 3
    assert losses[-1] < losses[0]


def test_a_period_boundary_keeps_the_function_and_restarts_the_subproblem():
    model = rso_model(seed=5)
    opt = RSOAdamW(model, lr=1e-2, period_steps=3, seed=5)
    tokens = torch.randint(CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    for _ in range(2):
        loss_of(model, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss_of(model, tokens).backward()
    name, linear, proj = next(rso_layers(model))
    w0, p0 = linear.weight.detach().clone(), proj.p.clone()
    with torch.no_grad():  # the function just before the boundary, with step 3's update
        opt._adam(opt.param_groups[0])
        opt._adam(opt.param_groups[1])
        opt.rso_group["period_step"] += 1
        b = linear.rso_b.detach().clone()
        before = model(tokens[:, :-1])
        opt.next_period()
        after = model(tokens[:, :-1])
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear.weight, w0 + b @ p0.T, rtol=0, atol=1e-15)
    assert not linear.rso_b.any() and linear.weight.grad is None
    assert all(not v.any() for v in opt.state[linear.rso_b].values())
    assert opt.rso_group["step"] == 0 and opt.rso_group["period"] == 1
    torch.testing.assert_close(proj.p, draw_projection(5, name.rsplit(".", 1)[0] + ".rso_"
                                                       + proj.members[0], 1,
                                                       tuple(p0.shape)).double())
    assert not torch.equal(proj.p, p0)


def test_fold_gives_a_plain_model_computing_the_same_function():
    model = rso_model(seed=7)
    with torch.no_grad():
        for _, linear, _ in rso_layers(model):
            linear.rso_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(8))
    tokens = torch.randint(CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(tokens)
    fold_rso(model)
    assert not any("rso" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(build_model(CFG).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-12, atol=1e-12)


def test_rso_under_bf16_autocast_keeps_fp32_gradients():
    model = rso_model(dtype=torch.float32)
    tokens = torch.randint(CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, tokens)
    loss.backward()
    for _, linear, _ in rso_layers(model):
        assert linear.rso_b.grad.dtype == torch.float32 and linear.rso_b.grad.abs().sum() > 0


def test_bad_settings_are_clear_errors():
    model = build_model(CFG)
    with pytest.raises(ValueError, match="match no bias-free linear"):
        install_rso(model, 8, ["nothing_here"])
    with pytest.raises(ValueError, match="already has RSO linears"):
        install_rso(rso_model(), 8, TARGETS)
    with pytest.raises(ValueError, match="call install_rso first"):
        RSOAdamW(model)
    with pytest.raises(ValueError, match="period_steps must be >= 1"):
        RSOAdamW(rso_model(), period_steps=0)


def test_install_rso_works_on_a_hugging_face_llama():
    """The library path: a transformers LlamaForCausalLM gets RSO linears, q/k/v and
    gate/up share their P, and B's gradient is the projection of the dense one."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).double()
    twin = copy.deepcopy(model)
    install_rso(model, 8, TARGETS, seed=1)
    assert len(dict(projections(model))) == 4 * 2
    tokens = torch.randint(64, (2, 9), generator=torch.Generator().manual_seed(2))
    model(input_ids=tokens, labels=tokens).loss.backward()
    twin(input_ids=tokens, labels=tokens).loss.backward()
    twin_params = dict(twin.named_parameters())
    for name, linear, proj in rso_layers(model):
        dense = twin_params[f"{name}.weight"].grad  # B = 0: W + B P^T is the twin's W
        torch.testing.assert_close(linear.rso_b.grad, dense @ proj.p, rtol=1e-11, atol=1e-13)
