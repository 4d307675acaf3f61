"""Hugging Face export: key mapping, safetensors round trip, and logits parity with HF LLaMA."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lotus_dist.hf_export import HFFolderError, export_hf, hf_key, hf_state_dict, load_hf
from lotus_dist.model import LlamaConfig, build_model, build_model_on_meta

# rope_theta and norm_eps differ from HF's defaults, so the parity test checks they are exported.
CFG = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    intermediate_size=176,
    vocab_size=128,
    max_seq_len=64,
    norm_eps=1e-5,
    rope_theta=500000.0,
)


def test_every_parameter_maps_to_exactly_one_hf_key_with_its_shape():
    model = build_model(CFG)
    params = dict(model.named_parameters())
    state = hf_state_dict(model)
    assert len(state) == len(params)
    assert {hf_key(name) for name in params} == state.keys()
    for name, param in params.items():
        assert state[hf_key(name)].shape == param.shape, name
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= state.keys()
    assert "model.layers.1.self_attn.q_proj.weight" in state
    assert "model.layers.1.mlp.down_proj.weight" in state


def test_hf_key_ignores_wrappers():
    assert hf_key("_orig_mod.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert hf_key("module.lm_head.weight") == "lm_head.weight"


def test_safetensors_round_trip_preserves_every_tensor(tmp_path):
    model = build_model(CFG, seed=1)
    out_dir = export_hf(model, tmp_path / "hf")
    loaded = load_file(out_dir / "model.safetensors")
    expected = hf_state_dict(model)
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_config_json_describes_the_architecture(tmp_path):
    out_dir = export_hf(build_model(CFG), tmp_path / "hf", dtype=torch.bfloat16)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == CFG.dim
    assert config["num_hidden_layers"] == CFG.n_layers
    assert config["num_key_value_heads"] == config["num_attention_heads"] == CFG.n_heads
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "bfloat16"
    loaded = load_file(out_dir / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())


def test_export_replaces_a_previous_export_and_leaves_no_temp_folders(tmp_path):
    export_hf(build_model(CFG, seed=1), tmp_path / "hf")
    second = build_model(CFG, seed=2)
    export_hf(second, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    loaded = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(loaded["lm_head.weight"], second.lm_head.weight)


def test_load_hf_gives_back_the_exported_model(tmp_path):
    model = build_model(CFG, seed=5)
    export_hf(model, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.cfg == CFG  # rope_theta and norm_eps included
    tokens = torch.randint(CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    export_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    weight = load_hf(tmp_path / "bf16").layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, model.layers[0].mlp.up_proj.weight.bfloat16().float())


@pytest.mark.parametrize(("change", "message"), [
    ({"num_key_value_heads": 2}, "grouped-query attention"),
    ({"tie_word_embeddings": True}, "tied input and output embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling llama3"),
    ({"intermediate_size": 200}, "does not match its config.json"),
    ({"hidden_size": 96}, "head_dim 16 is not hidden_size / num_attention_heads = 24"),
])
def test_load_hf_refuses_what_our_llama_does_not_model(tmp_path, change, message):
    out_dir = export_hf(build_model(CFG), tmp_path / "hf")
    config = json.loads((out_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(HFFolderError, match=message):
        load_hf(out_dir)


def test_load_hf_names_a_folder_without_weights(tmp_path):
    with pytest.raises(HFFolderError, match="is not a Hugging Face model folder"):
        load_hf(tmp_path)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_transformers_llama_gives_our_logits(tmp_path, attn_implementation):
    transformers = pytest.importorskip("transformers")
    model = build_model(CFG, seed=3)
    export_hf(model, tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation=attn_implementation
    )
    hf_model.eval()
    tokens = torch.randint(CFG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_export_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = build_model_on_meta(CFG)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        model.init_weights(seed=4)
        export_hf(model, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_export_on_every_rank_writes_the_full_model_once(tmp_path):
    out_dir = tmp_path / "hf"
    mp.spawn(_fsdp_export_worker, args=(2, _free_port(), str(out_dir)), nprocs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    loaded = load_file(out_dir / "model.safetensors")
    expected = hf_state_dict(build_model(CFG, seed=4))
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
