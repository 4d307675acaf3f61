"""Method presets: optim.name picks each method's own values (built in < the file's
methods.<name> < --set), config.yaml records what runs, grasswalk/grassjump map onto
LotusAdamW's options, every YAML carries every method, bad presets name the key."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from small_runs import small_run
from torch import nn

from launcher.capabilities import check_supported
from launcher.config import (
    LOW_RANK_METHODS,
    METHOD_PRESETS,
    METHODS,
    MODEL_SIZE_NAMES,
    PROJECTED_OPTIMIZERS,
    ConfigError,
    ConfigWarning,
    config_help,
    config_to_dict,
    load_config,
    method_optim_config,
    validate_world_size,
)
from launcher.optimizer import build_optimizer
from lotus_dist import LotusAdamW
from lotus_dist.projection import svd_basis

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
YAML_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def load_quietly(path, overrides=()):
    """load_config, failing the test on any ConfigWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        return load_config(path, list(overrides))


# ------------------------------------------------------------------ switching methods


@pytest.mark.parametrize("name", METHODS)
def test_without_a_file_each_method_gets_its_built_in_preset(name):
    cfg = load_quietly(None, [f"optim.name={name}"])
    for key, value in METHOD_PRESETS[name].items():
        section, _, leaf = (key if "." in key else f"optim.{key}").partition(".")
        assert getattr(getattr(cfg, section), leaf) == value, key


def test_switching_optim_name_switches_lr_scale_and_gap():
    lotus = load_quietly(CONFIGS / "60m.yaml")
    galore = load_quietly(CONFIGS / "60m.yaml", ["optim.name=galore"])
    adamw = load_quietly(CONFIGS / "60m.yaml", ["optim.name=adamw"])
    assert (lotus.optim.lr, lotus.optim.scale, lotus.optim.gamma) == (0.02, 0.3, 0.009)
    assert (lotus.optim.projection, lotus.optim.switch) == ("rsvd", "displacement")
    assert lotus.training.min_lr_ratio == 0.2  # Table 7, a per-method training key
    assert (galore.optim.lr, galore.optim.scale, galore.optim.update_proj_gap) == (0.01, 0.25,
                                                                                   200)
    assert (galore.optim.projection, galore.optim.switch, galore.optim.moments) == (
        "svd", "fixed", "keep")
    assert galore.training.min_lr_ratio == 0.1
    assert adamw.optim.lr == 0.001
    assert lotus.optim.rank == galore.optim.rank == 128
    assert galore.run.dir == "runs/60m-galore"


def test_set_always_wins_over_the_preset_in_any_order():
    cfg = load_quietly(CONFIGS / "60m.yaml", ["optim.lr=0.003", "optim.name=galore",
                                              "optim.update_proj_gap=7", "optim.scale=0.5",
                                              "training.min_lr_ratio=0.3"])
    assert (cfg.optim.lr, cfg.optim.update_proj_gap, cfg.optim.scale) == (0.003, 7, 0.5)
    assert cfg.training.min_lr_ratio == 0.3
    # a --set of a method-defining key runs as set (and config.yaml says so)
    cfg = load_quietly(CONFIGS / "60m.yaml", ["optim.name=galore", "optim.projection=rsvd",
                                              "optim.rank=4"])
    assert cfg.optim.projection == "rsvd"
    assert build_optimizer(cfg.optim, Toy(), seed=0).param_groups[-1]["projection"] == "rsvd"


def test_file_preset_beats_built_in_and_file_optim_keys(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  name: galore\n  weight_decay: 0.1\n"
                                "methods:\n  galore:\n    lr: 0.004\n    rank: 16\n")
    cfg = load_quietly(path)
    assert (cfg.optim.lr, cfg.optim.rank, cfg.optim.weight_decay) == (0.004, 16, 0.1)
    assert cfg.optim.scale == 0.25  # built-in preset, the file's entry does not name it


def test_a_file_optim_key_the_preset_replaces_is_warned_about(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  name: galore\n  lr: 0.02\n  scale: 0.25\n")
    with pytest.warns(ConfigWarning, match=r"optim\.lr=0\.02 -> 0\.01.*methods\.galore") as got:
        cfg = load_config(path, [])
    assert cfg.optim.lr == 0.01
    assert "optim.scale" not in str(got[0].message)  # same value: nothing replaced
    # a --set of the key says what the user wants: no warning
    assert load_quietly(path, ["optim.lr=0.02"]).optim.lr == 0.02


@pytest.mark.parametrize(("overrides", "named"), [
    (["optim.name=galore", "optim.gamma=0.02", "optim.verify_gap=5"],
     ["optim.gamma (--set)", "optim.verify_gap (--set)"]),
    (["optim.name=adamw", "optim.rank=8"], ["optim.rank (--set)"]),
    (["optim.name=lotus", "optim.update_proj_gap=9"], ["optim.update_proj_gap (--set)"]),
    (["optim.name=grassjump", "optim.walk_step=0.1"], ["optim.walk_step (--set)"]),
])
def test_keys_the_method_does_not_use_are_named_in_a_warning(overrides, named):
    with pytest.warns(ConfigWarning) as got:
        load_config(None, overrides)
    message = " ".join(str(w.message) for w in got)
    for key in named:
        assert key in message
    assert "not used by" in message


def test_keys_the_method_uses_give_no_warning():
    load_quietly(None, ["optim.name=lotus", "optim.gamma=0.02", "optim.rank=8"])
    load_quietly(None, ["optim.name=galore", "optim.update_proj_gap=9", "optim.rank=8"])
    load_quietly(None, ["optim.name=grasswalk", "optim.walk_step=0.2",
                        "optim.recovery_limiter=1.1"])


def test_unused_file_keys_at_their_default_are_not_warned_about(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  name: galore\n  verify_gap: 50\n  gamma: 0.5\n")
    with pytest.warns(ConfigWarning) as got:
        load_config(path, [])
    message = " ".join(str(w.message) for w in got)
    assert f"optim.gamma ({path})" in message and "verify_gap" not in message


# ------------------------------------------------------------------ config.yaml


def test_config_yaml_records_what_runs_and_loads_back(small_corpus, tmp_path):
    from launcher.train import run

    cfg = load_config(CONFIGS / "tiny.yaml", small_run(
        *small_corpus, tmp_path, "optim.name=galore", "optim.lr=0.005", "training.steps=2",
        "training.warmup_steps=0", "eval.interval=0", "eval.batches=1",
        "checkpoint.interval=0"))
    run(cfg)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["optim"]["projection"] == "svd" and written["optim"]["switch"] == "fixed"
    assert written["optim"]["scale"] == 0.25 and written["optim"]["lr"] == 0.005
    assert written["methods"] == {"galore": {
        "lr": 0.005, "scale": 0.25, "update_proj_gap": 200, "projection": "svd",
        "switch": "fixed", "moments": "keep", "recovery_scaling": False}}
    assert load_quietly(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("name", METHODS)
def test_config_to_dict_loads_back_for_every_method(tmp_path, name):
    cfg = load_quietly(CONFIGS / "60m.yaml", [f"optim.name={name}", "optim.lr=0.0042",
                                              "parallel.lowrank_comm=true",
                                              "training.min_lr_ratio=0.15"])
    path = write_yaml(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_quietly(path) == cfg


# ------------------------------------------------------------------ grasswalk / grassjump


class Toy(nn.Module):
    """One projected matrix (an 'mlp' weight, 24 x 16: right projection) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Linear(16, 24, bias=False)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mlp(x)))


def projected_group(optimizer: LotusAdamW) -> dict:
    (group,) = [g for g in optimizer.param_groups if "rank" in g]
    return group


@pytest.mark.parametrize(("name", "projection"), [("grasswalk", "grassmann"),
                                                  ("grassjump", "random")])
def test_grasswalk_and_grassjump_build_lotus_with_algorithm_1_options(name, projection):
    cfg = load_quietly(CONFIGS / "tiny.yaml", [f"optim.name={name}", "optim.rank=4"])
    optimizer = build_optimizer(cfg.optim, Toy(), seed=0)
    assert isinstance(optimizer, LotusAdamW)
    group = projected_group(optimizer)
    expected = {"projection": projection, "switch": "fixed", "moments": "rotate",
                "recovery_scaling": True, "recovery_limiter": 1.01, "update_proj_gap": 50,
                "scale": 0.25, "lr": 0.01, "rank": 4}
    assert {k: group[k] for k in expected} == expected
    if name == "grasswalk":
        assert group["walk_step"] == 0.5
    assert cfg.parallel.lowrank_comm is False  # recovery scaling needs the mean gradient


@pytest.mark.parametrize("name", ["grasswalk", "grassjump"])
def test_grass_methods_refresh_every_t_steps_from_the_initial_basis_algorithm_1_says(name):
    optimizer = build_optimizer(method_optim_config(name, rank=4, update_proj_gap=2),
                                model := Toy(), seed=0)
    x, y = torch.randn(32, 16), torch.randint(3, (32,))
    first_grad = None
    for step in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            first_grad = model.mlp.weight.grad.clone()
        optimizer.step()
        if step == 0:
            basis = optimizer.state[model.mlp.weight]["basis"]
            exact = svd_basis(first_grad, 4, "right")
            # GrassWalk starts from the top-r singular vectors; GrassJump from a random basis
            overlap = torch.linalg.matrix_norm(exact.T @ basis) ** 2 / 4
            assert (overlap > 0.999) if name == "grasswalk" else (overlap < 0.9)
    state = optimizer.state[model.mlp.weight]
    assert state["refresh_count"] == 3  # steps 1, 3 and 5 with T = 2
    assert torch.allclose(state["basis"].T @ state["basis"], torch.eye(4), atol=1e-5)
    assert "recovery_norm" in state


def test_galore_builds_galore_and_adamw_is_torch_adamw():
    group = projected_group(build_optimizer(method_optim_config("galore", rank=4), Toy(), 0))
    assert {k: group[k] for k in ("projection", "switch", "moments", "recovery_scaling",
                                  "update_proj_gap", "scale")} == {
        "projection": "svd", "switch": "fixed", "moments": "keep", "recovery_scaling": False,
        "update_proj_gap": 200, "scale": 0.25}
    adamw = build_optimizer(method_optim_config("adamw"), Toy(), 0)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 0.001


def test_grass_methods_under_lowrank_ddp_fail_with_a_clear_config_error():
    # the preset turns low-rank DDP off (recovery scaling needs the full mean gradient);
    # a user who turns it back on gets the engine's start-up error, not a wrong run
    assert load_quietly(CONFIGS / "60m.yaml", ["optim.name=grassjump"]).parallel.lowrank_comm \
        is False
    cfg = load_quietly(CONFIGS / "tiny.yaml", ["optim.name=grasswalk",
                                               "parallel.lowrank_comm=true"])
    with pytest.raises(ConfigError, match=r"recovery_scaling.*parallel\.lowrank_comm=false"):
        check_supported(cfg, "ddp_lowrank")


def test_every_low_rank_method_is_a_projected_optimizer():
    """All but AdamW and RSO (which trains low-rank B's instead of projecting gradients)."""
    assert set(PROJECTED_OPTIMIZERS) == set(METHODS) - {"adamw", "rso"}


# ------------------------------------------------------------------ the YAML files


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=lambda p: p.name)
def test_every_yaml_carries_every_method_and_loads_for_each(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw["methods"]) == set(METHODS)
    assert set(raw["optim"]) <= {"name", "weight_decay", "beta1", "beta2", "eps"}
    ranks = set()
    for name in METHODS:
        cfg = load_quietly(path, [f"optim.name={name}"])
        assert cfg.model.size == path.stem and cfg.optim.name == name
        assert cfg.optim.lr == raw["methods"][name]["lr"]
        if name in LOW_RANK_METHODS:
            ranks.add(cfg.optim.rank)
        if name in PROJECTED_OPTIMIZERS:
            assert cfg.optim.scale == raw["methods"][name]["scale"]
        for world_size in (1, 2):
            validate_world_size(cfg, world_size)
    assert len(ranks) == 1  # every low-rank method projects at the size's rank


@pytest.mark.parametrize("path", sorted(set(YAML_CONFIGS) - {CONFIGS / "tiny.yaml"}),
                         ids=lambda p: p.name)
def test_paper_sizes_use_galores_recipe_and_lotus_table_7(path):
    galore = load_quietly(path, ["optim.name=galore"])
    assert (galore.optim.lr, galore.optim.scale, galore.optim.update_proj_gap) == (0.01, 0.25,
                                                                                   200)
    lotus = load_quietly(path)
    table_7 = {"60m": (0.02, 0.009, 0.2), "130m": (0.02, 0.009, 0.2),
               "350m": (0.02, 0.02, 0.2), "1b": (0.025, 0.02, 0.1)}
    if path.stem in table_7:
        assert (lotus.optim.lr, lotus.optim.gamma, lotus.training.min_lr_ratio) == \
            table_7[path.stem]
    assert lotus.optim.scale == 0.3 and lotus.optim.verify_gap == 50


def test_every_size_name_has_a_yaml_with_presets():
    assert {p.stem for p in YAML_CONFIGS} == set(MODEL_SIZE_NAMES)


# ------------------------------------------------------------------ bad presets


@pytest.mark.parametrize(("text", "message"), [
    ("methods:\n  lotus:\n    gama: 0.01\n",
     r"unknown key methods\.lotus\.gama \(did you mean methods\.lotus\.gamma\?\)"),
    ("methods:\n  lotsu:\n    lr: 0.01\n",
     r"unknown method methods\.lotsu \(did you mean methods\.lotus\?\)"),
    ("methods:\n  galore:\n    lr: abc\n", r"methods\.galore\.lr expects float, got 'abc'"),
    ("methods:\n  galore:\n    switch: sometimes\n",
     r"methods\.galore\.switch expects one of fixed, displacement"),
    ("methods:\n  adamw:\n    training.stepz: 3\n",
     r"unknown key methods\.adamw\.training\.stepz \(did you mean "
     r"methods\.adamw\.training\.steps\?\)"),
    ("methods:\n  lotus:\n    name: galore\n", r"methods\.lotus\.name: a preset cannot change"),
    ("methods:\n  lotus: 3\n", r"methods\.lotus must be a mapping"),
    ("methods: [lotus]\n", r"section 'methods' must map method names"),
])
def test_bad_preset_is_an_error_naming_the_key_and_file(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, [])
    assert str(path) in str(info.value)


def test_a_bad_preset_of_another_method_still_fails(tmp_path):
    # every method's entry is checked, so the typo cannot wait for the day it is chosen
    path = write_yaml(tmp_path, "optim:\n  name: lotus\nmethods:\n  grassjump:\n    scael: 1\n")
    with pytest.raises(ConfigError, match=r"methods\.grassjump\.scael"):
        load_config(path, [])


def test_per_layer_needs_a_low_rank_method():
    with pytest.warns(ConfigWarning, match=r"optim\.per_layer"):
        cfg = load_config(None, ["optim.name=adamw", "optim.per_layer=true"])
    with pytest.raises(ConfigError,
                       match=r"optim\.per_layer=true needs a projected-gradient optim\.name"):
        check_supported(cfg, "single")


def test_help_lists_every_preset_with_its_source():
    text = config_help()
    for name in METHODS:
        entry = text.split(f"methods.{name} (", 1)[1].split("\n")[1].strip()
        assert entry, name
    assert "lr=0.01, scale=0.25, update_proj_gap=200, projection='svd'" in text


def test_only_rank_zero_warns_about_unused_keys(monkeypatch):
    """Every rank loads the config; one warning per job, not one per rank."""
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config("configs/tiny.yaml", ["optim.name=adamw", "optim.gamma=0.5"])
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(ConfigWarning, match="optim.gamma"):
        load_config("configs/tiny.yaml", ["optim.name=adamw", "optim.gamma=0.5"])
