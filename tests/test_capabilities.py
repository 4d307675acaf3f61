"""The capability table: every optimizer x engine x option combination is accepted or
refused at start-up as ``launcher.capabilities`` says, README shows that same table, and
the engine a run gets follows from the launch (named engines at any world size under a
process group)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from launcher.capabilities import (
    ENGINES,
    OPTIMIZERS,
    OPTIONS,
    check_supported,
    plan_run,
    resolve_engine,
    support_table,
)
from launcher.config import METHODS, ConfigError, load_config
from lotus_dist import LotusAdamW
from lotus_dist.comm import LocalComm

REPO = Path(__file__).resolve().parents[1]

#: For every option of the table: the overrides (and DeepSpeed JSON) that turn it on.
TURN_ON: dict[str, tuple[list[str], dict]] = {
    "optim.per_layer=true": (["optim.per_layer=true"], {}),
    "optim.per_layer=true with training.grad_clip>0":
        (["optim.per_layer=true", "training.grad_clip=1.0"], {}),
    "optim.projected_backward=true": (["optim.projected_backward=true"], {}),
    "optim.projected_backward=true with a full-gradient setting":
        (["optim.projected_backward=true", "optim.recovery_scaling=true"], {}),
    "training.clip_on=consumed": (["training.clip_on=consumed"], {}),
    "training.clip_on=gradient": (["training.clip_on=gradient"], {}),
    "optim.switch=path_efficiency": (["optim.switch=path_efficiency"], {}),
    "optim.recovery_scaling=true": (["optim.recovery_scaling=true"], {}),
    "training.compile=true with optim.name=rso":
        (["optim.name=rso", "training.compile=true"], {}),
    "parallel.mixed_precision=bf16": (["parallel.mixed_precision=bf16"], {}),
    "parallel.activation_checkpointing=true": (["parallel.activation_checkpointing=true"], {}),
    "parallel.fsdp_shard_bases=false": (["parallel.fsdp_shard_bases=false"], {}),
    "parallel.check_consistency=true": (["parallel.check_consistency=true"], {}),
    "zero_optimization.offload_optimizer":
        ([], {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
    "zero_optimization.offload_param":
        ([], {"zero_optimization": {"offload_param": {"device": "cpu"}}}),
    "zero_optimization.elastic_checkpoint":
        ([], {"zero_optimization": {"elastic_checkpoint": True}}),
    "zero_optimization.round_robin_gradients":
        ([], {"zero_optimization": {"round_robin_gradients": True}}),
}


def config(*sets: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(None, ["training.grad_clip=0", *sets])


def test_every_option_has_a_case():
    assert set(TURN_ON) == {o.key for o in OPTIONS}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.key)
@pytest.mark.parametrize("engine", ENGINES)
def test_an_option_runs_exactly_where_the_table_says(option, engine):
    sets, ds = TURN_ON[option.key]
    name = "lotus" if "lotus" in OPTIMIZERS[engine] else "adamw"  # ZeRO-3 runs only AdamW
    cfg = config(f"optim.name={name}", *sets)
    name = cfg.optim.name  # an option may be about another optimizer (rso)
    if name not in OPTIMIZERS[engine]:
        with pytest.raises(ConfigError, match=rf"optim\.name={name} does not run on"):
            check_supported(cfg, engine, ds)
        return
    if name not in option.optimizers:  # the optimizer is refused before any option
        with pytest.raises(ConfigError, match=r"needs a projected-gradient optim\.name"):
            check_supported(cfg, engine, ds)
        return
    if engine in option.engines:
        check_supported(cfg, engine, ds)
        return
    with pytest.raises(ConfigError) as refused:
        check_supported(cfg, engine, ds)
    # the message names this option, or another one these overrides turn on that the
    # engine refuses too (per_layer with clipping is also per_layer)
    refusing = [o.key for o in OPTIONS if o.active(cfg, ds) and engine not in o.engines]
    assert option.key in refusing
    assert any(str(refused.value).startswith(key) for key in refusing), refused.value


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("engine", ENGINES)
def test_an_optimizer_runs_exactly_where_the_table_says(name, engine):
    # grasswalk and grassjump presets turn on recovery scaling, an option of its own row
    cfg = config(f"optim.name={name}", "optim.recovery_scaling=false")
    if name in OPTIMIZERS[engine]:
        check_supported(cfg, engine)
    else:
        with pytest.raises(ConfigError, match=rf"optim.name={name} does not run on"):
            check_supported(cfg, engine)


def test_low_rank_options_refuse_adamw_naming_the_key():
    with pytest.raises(ConfigError,
                       match=r"optim.per_layer=true needs a projected-gradient optim.name"):
        check_supported(config("optim.name=adamw", "optim.per_layer=true"), "single")


def test_rso_is_refused_where_it_cannot_run_with_what_to_use_instead():
    for engine in ("deepspeed_zero1", "deepspeed_zero2"):
        with pytest.raises(ConfigError, match=r"optim.name=rso does not run on DeepSpeed.*"
                                              r"use parallel.engine=fsdp or ddp"):
            check_supported(config("optim.name=rso"), engine)
    with pytest.raises(ConfigError, match=r"training.compile=true with optim.name=rso"):
        check_supported(config("optim.name=rso", "training.compile=true"), "single")
    with pytest.raises(ConfigError, match=r"optim.projected_backward=true needs a "
                                          r"projected-gradient optim.name.*optim.name=rso"):
        check_supported(config("optim.name=rso", "optim.projected_backward=true"), "fsdp")


def test_readme_shows_the_table():
    readme = (REPO / "README.md").read_text()
    assert support_table() in readme, "regenerate README's table: " \
        "python -c 'from launcher.capabilities import support_table; print(support_table())'"


@pytest.mark.parametrize(("sets", "grouped", "engine"), [
    ((), False, "single"),
    ((), True, "ddp_lowrank"),
    (("optim.name=adamw",), True, "ddp"),
    (("parallel.lowrank_comm=false",), True, "ddp"),
    (("parallel.engine=fsdp",), False, "fsdp"),
    (("parallel.engine=fsdp",), True, "fsdp"),
])
def test_the_named_engine_runs_under_a_process_group_at_any_world_size(sets, grouped, engine):
    assert resolve_engine(config(*sets), grouped) == engine
    plan = plan_run(config(*sets), 1, grouped, torch.device("cpu"))
    assert plan.engine == engine
    assert plan.grouped == (grouped or "parallel.engine=fsdp" in sets)


def test_deepspeed_resolves_its_stage_from_the_json():
    cfg = config("parallel.engine=deepspeed", "optim.name=adamw",
                 "parallel.deepspeed_config=configs/deepspeed/zero3.json")
    plan = plan_run(cfg, 1, False, torch.device("cpu"))
    assert plan.engine == "deepspeed_zero3" and plan.deepspeed["zero_optimization"]["stage"] == 3


def test_accumulation_steps_come_from_the_plan():
    cfg = config("training.batch_size=24", "training.micro_batch_size=2")
    assert [plan_run(cfg, w, w > 1, torch.device("cpu")).accum_steps
            for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    with pytest.raises(ConfigError, match="divisible"):
        plan_run(cfg, 5, True, torch.device("cpu"))


def test_the_comm_is_fixed_at_construction():
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = LotusAdamW([{"params": [w], "rank": 2}])
    with pytest.raises(AttributeError):
        opt.comm = LocalComm()
