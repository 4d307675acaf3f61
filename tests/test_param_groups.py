"""lotus_param_groups: what it projects is logged, a target that matches nothing is named,
and its groups run in GaLore's own optimizer as well as in LotusAdamW."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lotus_dist import LotusAdamW, lotus_param_groups
from lotus_dist.model import LlamaConfig, build_model

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=2, intermediate_size=48, vocab_size=64,
                  max_seq_len=16)


class GPT2Block(nn.Module):
    """GPT-2's module names: attention is ``attn``, not LLaMA's ``self_attn``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(16, 48)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(16, 64)
        self.ln_1 = nn.LayerNorm(16)


def gpt2_like() -> nn.Module:
    model = nn.Module()
    model.h = nn.ModuleList(GPT2Block() for _ in range(3))
    model.wte = nn.Embedding(50, 16)
    return model


def test_the_matched_matrices_are_logged_compactly(caplog):
    with caplog.at_level(logging.INFO, logger="lotus_dist"):
        groups = lotus_param_groups(build_model(CFG), rank=4)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "lotus_dist"]
    assert "14 matrices projected at rank 4" in message
    assert "layers.*.self_attn.q_proj.weight x2" in message
    assert "layers.*.mlp.down_proj.weight x2" in message
    assert len(groups[1]["params"]) == 14


def test_a_target_that_matches_nothing_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"target_modules entries \['self_attn'\] match no 2-D "
                                         r"weight of the model \(the other targets match 3\)"):
        groups = lotus_param_groups(gpt2_like(), rank=4)  # the default: self_attn, mlp
    assert [name for name, _ in groups[1]["params"]] == [f"h.{i}.mlp.c_fc.weight"
                                                          for i in range(3)]


def test_no_match_at_all_is_an_error_naming_the_argument_and_the_weights():
    with pytest.raises(ValueError) as info:
        lotus_param_groups(gpt2_like(), rank=4, target_modules=["self_attn"])
    message = str(info.value)
    assert "target_modules=['self_attn'] matches no 2-D weight" in message
    assert "optim." not in message  # a library call names its argument, not a config key
    assert "h.*.attn.c_attn.weight x3" in message


def test_a_single_string_target_is_one_target_not_its_letters():
    groups = lotus_param_groups(gpt2_like(), rank=4, target_modules="attn")
    # Its letters would also match the embedding "wte" (a "t").
    assert [name for name, _ in groups[1]["params"]] == [f"h.{i}.attn.c_attn.weight"
                                                          for i in range(3)]


def test_the_projected_group_carries_galores_keys():
    groups = lotus_param_groups(build_model(CFG), rank=4, scale=0.5, projection="svd")
    plain, projected = groups
    assert "rank" not in plain
    assert {k: projected[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == {
        "rank": 4, "update_proj_gap": 200, "scale": 0.5, "proj_type": "std"}
    assert projected["projection"] == "svd"


def train(optimizer_cls, steps: int = 6, **kwargs) -> nn.Module:
    model = build_model(CFG, seed=1)
    groups = lotus_param_groups(model, rank=4, update_proj_gap=3, scale=0.25)
    optimizer = optimizer_cls(groups, lr=1e-2, **kwargs)
    tokens = torch.randint(CFG.vocab_size, (4, 9), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_galore_torch_runs_the_same_groups_as_lotus_exact_galore():
    """galore_torch.GaLoreAdamW on our groups takes the steps LotusAdamW's exact-GaLore mode
    (svd, fixed switch) takes: same keys, same meaning."""
    galore_torch = pytest.importorskip("galore_torch")
    theirs = train(galore_torch.GaLoreAdamW, weight_decay=0.0)
    ours = train(LotusAdamW, projection="svd", switch="fixed")
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(ours.layers[0].mlp.up_proj.weight,
                           build_model(CFG, seed=1).layers[0].mlp.up_proj.weight)
