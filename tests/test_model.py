"""The LLaMA model: shapes, causality, deterministic init, sizes, and that it can learn."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lotus_dist import model as model_module
from lotus_dist.model import (
    INIT_STD,
    MODEL_SIZES,
    LlamaConfig,
    apply_rope,
    build_model,
    build_model_on_meta,
    canonical_name,
    rope_tables,
    rotate_half,
)

TINY = dataclasses.replace(MODEL_SIZES["tiny"], vocab_size=256, max_seq_len=64)
SMALL = LlamaConfig(dim=32, n_layers=2, n_heads=4, intermediate_size=88, vocab_size=64)
# Odd row counts (vocab, MLP width) so FSDP shards them unevenly on 2 ranks.
ODD = LlamaConfig(dim=32, n_layers=2, n_heads=4, intermediate_size=87, vocab_size=67)


def random_tokens(cfg: LlamaConfig, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(cfg.vocab_size, (batch, seq_len), generator=generator)


def test_forward_returns_float_logits_of_shape_batch_seq_vocab():
    model = build_model(TINY)
    logits = model(random_tokens(TINY, batch=2, seq_len=16))
    assert logits.shape == (2, 16, TINY.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_module_names_are_hf_llama_names():
    names = {name for name, _ in build_model_on_meta(SMALL).named_parameters()}
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(SMALL.n_layers):
        expected |= {
            f"layers.{i}.input_layernorm.weight",
            f"layers.{i}.post_attention_layernorm.weight",
        }
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = build_model(TINY)
    tokens = random_tokens(TINY, batch=1, seq_len=24)
    changed = tokens.clone()
    changed[0, 10] = (tokens[0, 10] + 1) % TINY.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


def rope_in_x_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as it was, all in x's dtype: the reference for fp32 and for bf16."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def test_bf16_rope_in_fp32_is_closer_to_fp64_than_with_bf16_tables():
    head_dim, seq_len = 64, 2048
    cos, sin = rope_tables(head_dim, seq_len, 10000.0, torch.device("cpu"))
    channels = torch.arange(0, head_dim, 2, dtype=torch.float64)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64),
                         1.0 / 10000.0 ** (channels / head_dim)).repeat(1, 2)
    q = torch.randn(2, 4, seq_len, head_dim, generator=torch.Generator().manual_seed(0))
    q = q.bfloat16()
    exact = q.double() * angles.cos() + rotate_half(q.double()) * angles.sin()
    rotated = apply_rope(q, cos, sin)
    assert rotated.dtype == torch.bfloat16
    error = (rotated.double() - exact).abs().mean()
    bf16_tables_error = (rope_in_x_dtype(q, cos, sin).double() - exact).abs().mean()
    assert error < 0.75 * bf16_tables_error


def test_fp32_forward_is_bitwise_the_rotation_in_x_dtype(monkeypatch):
    model = build_model(SMALL)
    tokens = random_tokens(SMALL, batch=2, seq_len=16)
    with torch.no_grad():
        logits = model(tokens)
        monkeypatch.setattr(model_module, "apply_rope", rope_in_x_dtype)
        assert torch.equal(model(tokens), logits)


def test_rope_under_bf16_autocast_rotates_with_fp32_tables_and_returns_bf16(monkeypatch):
    seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []

    def recording(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = apply_rope(x, cos, sin)
        seen.append((x.dtype, cos.dtype, out.dtype))
        return out

    monkeypatch.setattr(model_module, "apply_rope", recording)
    model = build_model(SMALL)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(random_tokens(SMALL, batch=1, seq_len=8))
    assert set(seen) == {(torch.bfloat16, torch.float32, torch.bfloat16)}
    assert len(seen) == 2 * SMALL.n_layers  # q and k of every layer


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = build_model(SMALL)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))


def test_init_is_deterministic_for_a_seed_and_ignores_the_global_rng():
    torch.manual_seed(1)
    first = build_model(TINY, seed=7).state_dict()
    torch.manual_seed(2)
    torch.rand(100)
    second = build_model(TINY, seed=7).state_dict()
    other_seed = build_model(TINY, seed=8).state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    probe = "layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[probe], other_seed[probe])


def test_init_fills_every_tensor_with_the_documented_distributions():
    model = build_model_on_meta(TINY)
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.fill_(float("nan"))
    model.init_weights(seed=0)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("proj.weight") or name in ("embed_tokens.weight", "lm_head.weight"):
            assert abs(tensor.std().item() - INIT_STD) < 0.1 * INIT_STD, name
            assert abs(tensor.mean().item()) < 0.1 * INIT_STD, name


def test_each_weight_depends_only_on_seed_and_name():
    shallow = build_model(dataclasses.replace(TINY, n_layers=1), seed=3).state_dict()
    deep = build_model(TINY, seed=3).state_dict()
    for name, tensor in shallow.items():
        assert torch.equal(tensor, deep[name]), name
    first_q, second_q = (deep[f"layers.{i}.self_attn.q_proj.weight"] for i in (0, 1))
    assert not torch.equal(first_q, second_q)


def test_canonical_name_drops_wrapper_segments():
    assert canonical_name("module.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "layers.0.mlp.up_proj.weight"
    )
    assert canonical_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_init_weights_on_meta_asks_for_to_empty():
    with pytest.raises(RuntimeError, match="to_empty"):
        build_model_on_meta(SMALL).init_weights(0)


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_every_size_constructs_on_meta_with_the_counted_parameters(size):
    cfg = MODEL_SIZES[size]
    model = build_model_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == cfg.n_layers
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params


@pytest.mark.parametrize(
    ("size", "expected"),
    # GaLore's 60M (58.1M with the 32000 vocabulary) and LLaMA-7B's published 6.74B.
    [("60m", 58.07e6), ("7b", 6.738e9)],
)
def test_parameter_counts_match_published_sizes(size, expected):
    model = build_model_on_meta(MODEL_SIZES[size])
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(expected, rel=0.02)


def test_flops_per_token_is_six_n_plus_attention_term():
    cfg = MODEL_SIZES["7b"]
    model = build_model_on_meta(cfg)
    non_embedding = cfg.num_params - cfg.vocab_size * cfg.dim
    expected = 6 * non_embedding + 12 * cfg.n_layers * cfg.dim * 2048
    assert model.flops_per_token(2048) == expected


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, n_layers=2)
    model = build_model(cfg, seed=0)
    tokens = random_tokens(cfg, batch=4, seq_len=32, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(cfg.vocab_size)).item(), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_init_worker(rank: int, world_size: int, port: int, out_path: str) -> None:
    """Shard on meta, materialise, init; rank 0 saves the gathered weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    def placement(param: torch.nn.Parameter) -> Shard:
        # Square (attention) matrices on dim 1, as Lotus's FSDP path does for some matrices;
        # the rest on dim 0, where ODD's row counts split unevenly.
        return Shard(1) if param.ndim == 2 and param.shape[0] == param.shape[1] else Shard(0)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = build_model_on_meta(ODD)
        for block in model.layers:
            fully_shard(block, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)
        model.to_empty(device="cpu")
        model.init_weights(seed=5)
        gathered = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_sharded_init_equals_single_process_init(tmp_path):
    world_size, out_path = 2, str(tmp_path / "weights.pt")
    mp.spawn(_fsdp_init_worker, args=(world_size, _free_port(), out_path), nprocs=world_size)
    sharded = torch.load(out_path, weights_only=True)
    reference = build_model(ODD, seed=5).state_dict()
    assert sharded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(sharded[name], tensor), name
