"""Config: defaults < YAML < --set, type checks, and errors that name the key and source."""

import re
from pathlib import Path

import pytest
import yaml

from launcher.config import (
    MODEL_SIZE_NAMES,
    Config,
    ConfigError,
    ConfigWarning,
    config_help,
    config_to_dict,
    load_config,
    validate_world_size,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
YAML_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    Config().validate()
    assert load_config(None, []).run.dir == "runs/tiny-lotus"


def test_model_size_names_are_the_model_modules_sizes():
    from lotus_dist.model import MODEL_SIZES

    assert set(MODEL_SIZE_NAMES) == set(MODEL_SIZES)


def test_every_size_has_a_config():
    assert {p.stem for p in YAML_CONFIGS} == set(MODEL_SIZE_NAMES)


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=lambda p: p.name)
def test_every_yaml_config_loads_and_validates(path):
    cfg = load_config(path, [])
    assert cfg.model.size == path.stem
    world_sizes = (1, 2) if path.stem == "tiny" else (1, 2, 4, 8)
    for world_size in world_sizes:
        validate_world_size(cfg, world_size)


@pytest.mark.parametrize("path", sorted(set(YAML_CONFIGS) - {CONFIGS / "tiny.yaml"}),
                         ids=lambda p: p.name)
def test_paper_configs_use_galore_c4_recipe(path):
    cfg = load_config(path, [])
    assert (cfg.training.batch_size, cfg.training.seq_len) == (512, 256)
    assert cfg.model.vocab_size == 32000
    assert cfg.training.warmup_steps == cfg.training.steps // 10
    assert cfg.optim.scale == 0.3 and cfg.optim.verify_gap == 50


def test_set_overrides_file_which_overrides_defaults(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  rank: 64\n  weight_decay: 0.02\n")
    cfg = load_config(path, ["optim.rank=16"])
    assert cfg.optim.rank == 16  # --set beats the file
    assert cfg.optim.weight_decay == 0.02  # the file beats the default
    assert cfg.optim.beta1 == 0.9  # default
    # the method's preset sits between the file's optim keys and --set (test_presets.py)


def test_later_set_wins():
    assert load_config(None, ["training.seed=1", "training.seed=2"]).training.seed == 2


def test_set_values_get_their_types_from_yaml():
    cfg = load_config(None, [
        "training.steps=300", "optim.lr=1e-3", "data.shuffle=false",
        "optim.target_modules=[self_attn]", "model.vocab_size=null", "model.vocab_size=512",
        "optim.gamma=0.02",
    ])
    assert cfg.training.steps == 300
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.data.shuffle is False
    assert cfg.optim.target_modules == ["self_attn"]
    assert cfg.model.vocab_size == 512
    assert cfg.optim.gamma == 0.02


def test_set_keeps_the_text_for_string_fields():
    assert load_config(None, ["run.dir=2024"]).run.dir == "2024"


def test_yaml_float_without_a_dot_is_a_float(tmp_path):
    # PyYAML reads 2e-2 as the string "2e-2"; a float field takes it as the number.
    path = write_yaml(tmp_path, "optim:\n  weight_decay: 2e-2\n")
    assert load_config(path, []).optim.weight_decay == 0.02


def test_int_field_accepts_no_float_or_bool():
    with pytest.raises(ConfigError, match=r"training\.steps expects int, got 1\.5"):
        load_config(None, ["training.steps=1.5"])
    with pytest.raises(ConfigError, match=r"training\.steps expects int, got True"):
        load_config(None, ["training.steps=true"])


def test_bad_type_names_the_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"--set: training\.steps expects int, got 'abc'"):
        load_config(None, ["training.steps=abc"])


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError, match=r"optim\.name expects one of adamw, galore, lotus, "
                                          r"grasswalk, grassjump"):
        load_config(None, ["optim.name=sgd"])


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  rnak: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [])
    message = str(info.value)
    assert str(path) in message
    assert "unknown key optim.rnak (did you mean optim.rank?)" in message


def test_unknown_section_is_named_with_a_suggestion(tmp_path):
    path = write_yaml(tmp_path, "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key optimizer\.lr \(did you mean optim\.lr"):
        load_config(path, [])


def test_key_in_the_wrong_section_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"training\.lr \(did you mean optim\.lr\?\)"):
        load_config(None, ["training.lr=0.1"])


def test_set_without_equals_is_rejected():
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config(None, ["training.steps"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "training:\n  steps: 10\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r":\d+:\d+: malformed YAML"):
        load_config(path, [])
    path = write_yaml(tmp_path, "training:\n  steps: 10\n bad: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3:2: malformed YAML")):
        load_config(path, [])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml", [])


def test_section_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "training: 5\n")
    with pytest.raises(ConfigError, match="section 'training' must be a mapping"):
        load_config(path, [])


@pytest.mark.parametrize(("overrides", "message"), [
    (["training.warmup_steps=-1"], r"training\.warmup_steps \(-1\) must be a step count >= 0 "
                                   r"and < training\.steps \(200\), or a fraction"),
    (["training.warmup_steps=1.5"], r"training\.warmup_steps \(1\.5\) must be a step count"),
    (["optim.rank=0"], r"optim\.rank must be > 0 for optim\.name=lotus"),
    (["optim.lr=0"], r"optim\.lr must be > 0"),
    (["training.steps=0", "training.warmup_steps=0"], r"training\.steps must be > 0"),
    (["optim.gamma=-1"], r"optim\.gamma must be > 0"),
    (["optim.verify_gap=0"], r"optim\.verify_gap must be >= 1"),
    (["training.dtype=fp64", "parallel.engine=fsdp", "parallel.mixed_precision=bf16"],
     r"training\.dtype=fp64 keeps every tensor in float64"),
    (["training.batch_size=12"], r"training\.batch_size \(12\) must be a multiple of "
                                 r"training\.micro_batch_size \(8\)"),
    (["training.seq_len=2048"], r"training\.seq_len \(2048\) exceeds model\.max_seq_len"),
    (["parallel.deepspeed_config=ds.json"], r"parallel\.deepspeed_config is set but "
                                            r"parallel\.engine"),
])
def test_validation_names_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_float_warmup_is_a_fraction_of_the_steps():
    cfg = load_config(None, ["training.steps=55", "training.warmup_steps=0.1"])
    assert cfg.training.warmup_steps == 5  # int(0.1 * 55): a step count from here on
    assert load_config(None, ["training.warmup_steps=0.0"]).training.warmup_steps == 0
    assert load_config(None, ["training.warmup_steps=30"]).training.warmup_steps == 30


def test_a_warmup_the_run_is_too_short_for_becomes_a_tenth_of_it():
    with pytest.warns(ConfigWarning, match=r"training\.warmup_steps=1000 is not below "
                                           r"training\.steps=20: warming up for 2 steps"):
        cfg = load_config(CONFIGS / "60m.yaml", ["training.steps=20"])
    assert cfg.training.warmup_steps == 2
    with pytest.warns(ConfigWarning, match="warming up for 0 steps"):
        assert load_config(None, ["training.steps=5"]).training.warmup_steps == 0


def test_validation_lists_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lr=0", "optim.rank=0"])
    assert "optim.lr" in str(info.value) and "optim.rank" in str(info.value)


def test_fp64_is_a_training_dtype():
    assert load_config(None, ["training.dtype=fp64"]).training.dtype == "fp64"
    with pytest.raises(ConfigError, match=r"training\.dtype expects one of auto, fp32, bf16, "
                                          r"fp64"):
        load_config(None, ["training.dtype=fp16"])


def test_adamw_needs_no_rank():
    with pytest.warns(ConfigWarning, match=r"optim\.rank \(--set\): not used by optim\.name=adamw"):
        assert load_config(None, ["optim.name=adamw", "optim.rank=0"]).optim.rank == 0


def test_validate_catches_wrong_types_set_in_code():
    cfg = Config()
    cfg.training.steps = "10"
    with pytest.raises(ConfigError, match=r"training\.steps expects int"):
        cfg.validate()


def test_world_size_must_divide_the_global_batch():
    cfg = load_config(None, ["training.batch_size=16", "training.micro_batch_size=4"])
    assert validate_world_size(cfg, 2) == 2  # micro-batches per rank per step
    with pytest.raises(ConfigError, match=r"training\.batch_size \(16\).*"
                                          r"training\.micro_batch_size \(4\) x world size \(3\)"):
        validate_world_size(cfg, 3)


def test_run_dir_placeholders_are_filled():
    cfg = load_config(None, ["run.dir=out/{model.size}/{optim.name}-r{optim.rank}"])
    assert cfg.run.dir == "out/tiny/lotus-r128"
    with pytest.raises(ConfigError, match=r"run\.dir"):
        load_config(None, ["run.dir=out/{nosuch.key}"])


def test_config_to_dict_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(CONFIGS / "60m.yaml", ["optim.gamma=null"])
    path = write_yaml(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path, []) == cfg


def test_help_documents_every_key():
    help_text = config_help()  # methods.<name>: the presets, documented in the help too
    for section, values in config_to_dict(Config()).items():
        for key in values:
            entry = help_text.split(f"{section}.{key} (", 1)[1].split("\n")[1].strip()
            assert entry, f"{section}.{key} has no docstring"
