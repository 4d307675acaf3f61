"""Run configuration: documented dataclasses, filled from defaults < YAML < preset < ``--set``.

Every field carries a one-line docstring; ``config_help()`` turns those into the help
text, so the documentation and the CLI cannot drift apart. A YAML file may only name
known sections and keys, and every value is checked against its field's type, so a
typo (``optim.rnak``) or a bad value (``training.steps=abc``) fails at start-up with a
message that names the key and where it came from, not hours later inside the trainer.

Method presets. Each ``optim.name`` has a preset: the values its paper runs with
(``METHOD_PRESETS`` below, shown by ``config_help()``), so switching
``--set optim.name=galore`` switches to GaLore's settings instead of inheriting Lotus's.
A YAML file may add or replace values per method in a top-level ``methods:`` section,
one mapping per method; an entry is an ``optim`` key (``lr: 0.02``) or a dotted key of
another section (``training.min_lr_ratio: 0.2``). Precedence, lowest first: the field
defaults; the file's sections (its ``optim:`` keys are the ones common to all methods);
the chosen method's preset, built in then the file's ``methods.<name>``; ``--set`` (a
``--set`` always wins). ``optim`` keys the chosen method does not use (``optim.gamma``
with a fixed switch, ``optim.rank`` with adamw), set with ``--set`` or to a non-default
value in the file's ``optim:`` section, are named in a ``ConfigWarning``, and so is a
file ``optim:`` key that the preset replaces. ``config_to_dict`` records the values that
run and, under ``methods.<name>``, the preset keys with those values, so a written
``config.yaml`` loads back to the same config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import keyword
import os
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ModelSize = Literal["tiny", "20m", "35m", "60m", "130m", "350m", "1b", "3b", "7b"]
# The keys of lotus_dist.model.MODEL_SIZES, repeated here so that loading a config does
# not import the model (and torch) just to check a name.
MODEL_SIZE_NAMES: tuple[str, ...] = typing.get_args(ModelSize)

OptimName = Literal["adamw", "galore", "lotus", "grasswalk", "grassjump", "rso"]
METHODS: tuple[str, ...] = typing.get_args(OptimName)
#: Methods that run LotusAdamW with projected groups (the engines check this list).
PROJECTED_OPTIMIZERS: tuple[str, ...] = ("galore", "lotus", "grasswalk", "grassjump")
#: Methods with a rank: the projected ones and RSO (low-rank B's in random subspaces).
LOW_RANK_METHODS: tuple[str, ...] = (*PROJECTED_OPTIMIZERS, "rso")

#: Built-in preset per ``optim.name``: applied over the file's common ``optim:`` keys and
#: under the file's ``methods.<name>`` and ``--set``. A key is an ``optim`` key, or
#: ``section.key`` for another section. Sources are in ``METHOD_SOURCES``.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3},
    "galore": {"lr": 0.01, "scale": 0.25, "update_proj_gap": 200, "projection": "svd",
               "switch": "fixed", "moments": "keep", "recovery_scaling": False},
    "lotus": {"lr": 0.02, "scale": 0.3, "projection": "rsvd", "switch": "displacement",
              "gamma": 0.009, "verify_gap": 50, "min_gap": 0, "power_iters": 1,
              "oversample": 8, "moments": "keep", "recovery_scaling": False},
    "grasswalk": {"lr": 0.01, "scale": 0.25, "projection": "grassmann", "walk_step": 0.5,
                  "switch": "fixed", "update_proj_gap": 200, "moments": "rotate",
                  "recovery_scaling": True, "recovery_limiter": 1.01,
                  "parallel.lowrank_comm": False},
    "grassjump": {"lr": 0.01, "scale": 0.25, "projection": "random", "switch": "fixed",
                  "update_proj_gap": 200, "moments": "rotate", "recovery_scaling": True,
                  "recovery_limiter": 1.01, "parallel.lowrank_comm": False},
    "rso": {"lr": 1e-3, "update_proj_gap": 200, "proximal": 0.01},
}

#: Where each built-in preset's values come from (shown by ``config_help()``).
METHOD_SOURCES: dict[str, str] = {
    "adamw": "Full-rank AdamW baseline. GaLore (Zhao et al. 2024, App. pre-training details) "
             "tunes the baseline's lr per size over {1e-2, 5e-3, 1e-3, 5e-4, 1e-4} without "
             "printing the winners; 1e-3, the usual pick for LLaMA 60M-350M on C4, is our "
             "choice.",
    "galore": "GaLore's C4 recipe, the same for every size: lr 0.01, scale alpha 0.25, "
              "subspace frequency T = update_proj_gap 200, exact SVD on a fixed interval, "
              "Adam moments kept across refreshes (GaLore's algorithm exactly).",
    "lotus": "Lotus Table 7, 60M column (LR 0.02, alpha 0.3, threshold gamma 0.009; the min "
             "LR ratio is a per-size YAML value) with verifying gap eta 50 (Lotus App., "
             "'threshold around 0.01 and verifying gap as 50'); rSVD with 1 power iteration "
             "and 8 oversampling columns and T_min 0 are our choices (the paper's Thm 3.1 "
             "takes p ~ 5 and gives no q or T_min for pre-training).",
    "grasswalk": "GrassWalk (Rajabi et al., Algorithm 1): basis S_0 from an SVD of the first "
                 "gradient, then a random geodesic step on the Grassmannian every T = "
                 "update_proj_gap steps, Adam moments rotated into the new basis (AO), "
                 "recovery scaling of the residual with limiter zeta = recovery_limiter "
                 "(RS). The paper prints no values, so all are our choices: lr 0.01, scale "
                 "0.25 and T 200 from GaLore's recipe (the codebase it builds on; scale "
                 "multiplies the low-rank term only, the recovery term is added as in Fira, "
                 "docs/algorithm.md), zeta 1.01 (Fira's limiter) and walk_step 0.5, the "
                 "largest principal angle (radians) of one step. Recovery scaling needs the "
                 "full mean gradient, so the preset sets parallel.lowrank_comm false.",
    "grassjump": "GrassJump (Rajabi et al., Algorithm 1): a fresh random basis (orthonormalised "
                 "Gaussian) at the start and every T = update_proj_gap steps, moments "
                 "rotated (AO), recovery scaling (RS). Values as for grasswalk, all our "
                 "choices (the paper prints none); parallel.lowrank_comm false for RS.",
    "rso": "RSO (Chen et al. 2025, Algorithm 1): each targeted linear trains B in a random "
           "subspace P (N(0, 1/r) entries) with W frozen, for update_proj_gap steps per "
           "subspace, then W += B P^T and B restarts. The summary we work from prints no "
           "values: lr 1e-3 is AdamW's (P's scale makes a B step move W entries by about "
           "lr, as AdamW does), T 200 GaLore's frequency, and proximal 0.01 (1/eta_k; the "
           "paper's eta_k = 1/(2 L-hat) needs a smoothness constant nobody knows) a mild "
           "pull of B towards the period's start; all our choices (docs/algorithm.md).",
}


class ConfigError(ValueError):
    """A config problem; the message names the key (and the file or flag it came from)."""


class ConfigWarning(UserWarning):
    """Set keys the chosen method ignores, file keys its preset replaces (see above), or a
    training.warmup_steps cut to fit a short run."""


@dataclass
class ModelConfig:
    """model.*: which LLaMA shape to train."""

    size: ModelSize = "tiny"
    """Model shape: a key of lotus_dist.model.MODEL_SIZES."""
    vocab_size: int | None = None
    """Vocabulary size; null takes the tokenizer's."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables cover; at least training.seq_len."""


@dataclass
class DataConfig:
    """data.*: the corpus and the tokenizer."""

    path: str = "data/sample"
    """Local C4-layout folder (built on first use if it is data/sample) or a hub name."""
    tokenizer: str = "data/sample/tokenizer.json"
    """tokenizer.json path or hub tokenizer name (e.g. t5-base)."""
    tokenizer_vocab_size: int = 4096
    """Vocabulary size when building the sample tokenizer."""
    shuffle: bool = True
    """Shuffle documents resumably (the order depends on training.seed only)."""
    shuffle_chunk: int = 1024
    """Shuffle window, in sequence blocks."""
    hub_config: str = "en"
    """Dataset config name when data.path is a hub name."""
    on_error: Literal["skip", "stop"] = "skip"
    """Malformed records and unreadable files (truncated gzip): skip them (counted in the
    log, metrics and summary.json, each named with its file and byte offset) or stop."""


@dataclass
class OptimConfig:
    """optim.*: the optimizer; the projection keys mean what LotusAdamW's group keys mean."""

    name: OptimName = "lotus"
    """Optimizer: adamw (full rank), galore (exact SVD, fixed interval), lotus (rSVD,
    adaptive switch), grasswalk or grassjump (Grassmann walk / random jump every
    update_proj_gap steps, rotated moments, recovery scaling), rso (random subspace
    optimization: low-rank B per linear, W frozen for update_proj_gap steps); each comes
    with its preset (methods.<name> in config_help)."""
    lr: float = 0.01
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.999
    """Adam second-moment decay."""
    eps: float = 1e-6
    """Adam epsilon (GaLore's 1e-6)."""
    rank: int = 128
    """Rank r of the gradient projection (galore, lotus) or of RSO's subspaces."""
    update_proj_gap: int = 200
    """Steps between refreshes for switch=fixed (GaLore's T); rso: steps per subspace."""
    proximal: float = 0.0
    """rso: weight 1/eta of the proximal term (1/2eta)||B||^2 of each subproblem."""
    scale: float = 0.25
    """Scale alpha applied to the projected-back update."""
    proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
    """Which side to project; std projects the smaller dimension."""
    projection: Literal["svd", "rsvd", "random", "grassmann"] = "rsvd"
    """How a refresh computes the basis."""
    switch: Literal["fixed", "displacement", "momentum_displacement", "path_efficiency"] = \
        "displacement"
    """When to refresh the basis: fixed (every update_proj_gap steps), displacement (Lotus
    Algorithm 2), momentum_displacement (ours: the same test on Adam's first moment, per
    window; docs/algorithm.md) or path_efficiency (Lotus eq. 5)."""
    gamma: float | None = None
    """Switch threshold; null takes the optimizer's default for the switch rule."""
    verify_gap: int = 50
    """Steps between switch checks (the paper's eta)."""
    min_gap: int = 0
    """Fewest steps between refreshes (the paper's T_min); 0 sets no minimum."""
    power_iters: int = 1
    """Power iterations of the randomized SVD."""
    oversample: int = 8
    """Oversampling columns p of the randomized SVD."""
    walk_step: float = 0.5
    """Step size of a projection=grassmann refresh."""
    moments: Literal["keep", "reset", "rotate"] = "keep"
    """Adam moments at a refresh: keep (GaLore), reset, or rotate into the new basis."""
    recovery_scaling: bool = False
    """Add the scaled residual G - back-projection to the update (Fira / GrassWalk)."""
    recovery_limiter: float = 1.01
    """Cap on the growth of the recovery term's norm from one step to the next."""
    per_layer: bool = False
    """Step each parameter inside backward, freeing its gradient at once."""
    projected_backward: bool = False
    """Projected weights get R = project(G) straight from their activations in backward
    (``lotus_dist.projected_linear``), so their full gradient exists only on refresh steps."""
    nonfinite: Literal["skip", "raise"] = "skip"
    """On an inf/NaN gradient: skip the step (counted) or stop with an error."""
    target_modules: list[str] = field(default_factory=lambda: ["self_attn", "mlp"])
    """Name fragments of the 2-D weights to project; the rest get plain AdamW."""


@dataclass
class TrainingConfig:
    """training.*: steps, batch sizes, schedule and numerics."""

    steps: int = 200
    """Optimizer steps to train for."""
    batch_size: int = 16
    """Global batch, in sequences per optimizer step (independent of the world size)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on each rank; the rest is gradient accumulation."""
    seq_len: int = 128
    """Tokens per training sequence."""
    seed: int = 0
    """Seed of weights, data order and projection randomness."""
    warmup_steps: int | float = 20
    """Linear warmup before the cosine decay: a step count, or a float in [0, 1), the
    fraction of training.steps (0.1: the first 10%). A count not below training.steps (a
    short run of a long config) becomes training.steps // 10, with a warning."""
    min_lr_ratio: float = 0.1
    """The cosine decays to optim.lr * min_lr_ratio at the last step."""
    grad_clip: float = 0.0
    """Max global gradient norm; 0 disables clipping."""
    clip_on: Literal["auto", "gradient", "consumed"] = "auto"
    """Norm to clip on: the full gradient, or what the update consumes (R for projected
    matrices). auto is consumed for a low-rank optim.name on every engine and world size
    but DeepSpeed (which clips the full gradient inside its step), so that one process,
    DDP, low-rank DDP (which has no full gradient) and FSDP run the same algorithm;
    gradient for adamw."""
    dtype: Literal["auto", "fp32", "bf16", "fp64"] = "auto"
    """Compute dtype: auto is bf16 autocast on CUDA and fp32 on CPU; fp64 runs model, loss
    and optimizer in float64, where N ranks equal 1 rank to 1e-9 (exactness tests)."""
    log_interval: int = 10
    """Steps between metric rows and progress lines."""
    max_skipped_steps: int = 10
    """The run has diverged after this many bad steps in a row (skipped for a non-finite
    loss or gradient, or a loss spike); training.on_divergence says what happens then."""
    spike_factor: float = 3.0
    """A finite loss above this multiple of the running mean of recent good losses is a
    loss spike: a bad step (it is not skipped); 0 turns spike detection off."""
    on_divergence: Literal["stop", "rollback"] = "stop"
    """On divergence: stop with an error, or reload the newest checkpoint from before the
    bad steps and go on with the learning rate times training.rollback_lr_factor."""
    rollback_lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback (training.on_divergence)."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run before it stops with an error."""
    compile: bool = False
    """torch.compile each transformer block (in place: parameter and checkpoint names do
    not change). The first steps pay the compilation; on CPU it needs a C++ compiler."""
    profile_steps: str | list[int] = ""
    """Optimizer steps N..M (inclusive) to trace with torch.profiler, as "N,M" or [N, M],
    into run.dir/profile/ (open with TensorBoard); empty is off. Rank 0 only, unless
    run.log_all_ranks."""


@dataclass
class EvalConfig:
    """eval.*: validation loss and perplexity."""

    interval: int = 50
    """Steps between validation runs; 0 evaluates only at the end."""
    batches: int = 4
    """Validation batches per evaluation, each of training.batch_size sequences."""


@dataclass
class ParallelConfig:
    """parallel.*: how the ranks share the work."""

    engine: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """Data-parallel engine."""
    lowrank_comm: bool = True
    """All-reduce projected gradients in low rank (galore, lotus; ignored by adamw)."""
    check_consistency: bool = False
    """After each step, check that all ranks hold the same bases (debugging; ddp, fsdp)."""
    mixed_precision: Literal["auto", "none", "bf16"] = "auto"
    """FSDP's MixedPrecisionPolicy: bf16 gathers bf16 weights for compute and reduces
    fp32 gradients into fp32 sharded masters. auto is bf16 on CUDA when training.dtype
    computes in bf16 (auto or bf16), else none: under autocast, fp32 gathers would move
    twice the bytes only to be cast to bf16 (for the other engines use training.dtype)."""
    fsdp_grad_accumulation: Literal["sharded", "unsharded"] = "sharded"
    """FSDP with several micro-batches per step: sharded reduce-scatters every
    micro-batch's gradient and sums the shards (gradient memory 1/world size); unsharded
    sums whole fp32 gradients on every rank and reduce-scatters once per step (the
    gradient traffic divided by the micro-batches per step, but the whole model's
    gradients on every rank: about 27 GB at 7b)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON (configs/deepspeed/*.json); the batch sizes come from training.*."""
    fsdp_shard_bases: bool = True
    """fsdp: keep each rank's rows of every projection basis, so bases cost 1/W per rank
    like the rest of the optimizer state; each matrix then all-gathers its basis (d x r)
    when it projects and when it updates. false keeps every basis whole on every rank
    (3.5 GiB per rank at 7b rank 1024) and gathers nothing."""
    timeout_s: float = 1800.0
    """Seconds a collective may wait for a rank before the job fails (so torchrun or SLURM
    can restart it) instead of hanging on a stopped or dead rank."""


@dataclass
class RunConfig:
    """run.*: where outputs go and who logs."""

    dir: str = "runs/{model.size}-{optim.name}"
    """Run directory; {section.key} placeholders are filled from the config."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    log_all_ranks: bool = False
    """Every rank prints and writes its own metrics file, not only rank 0."""
    wandb_project: str | None = None
    """Also log the metric rows and the config to this Weights & Biases project (rank 0;
    pip install wandb). Entity, mode and run id come from WANDB_* environment variables."""


@dataclass
class CheckpointConfig:
    """checkpoint.*: saving and resuming."""

    interval: int = 100
    """Steps between checkpoints; 0 disables them."""
    keep_latest: int = 2
    """Complete checkpoints to keep; 0 keeps all."""
    resume: str = "auto"
    """auto (newest in run.dir/ckpt), never, or a checkpoint directory."""
    healthy_steps: int = 5
    """A save waits until this many steps in a row were good (no skip, no loss spike), so
    a diverging run never publishes, or prunes for, a damaged checkpoint."""
    async_: bool = False
    """Write checkpoints in the background (DCP async save): training goes on while the
    files are written; the checkpoint is published once every rank has finished."""


@dataclass
class Config:
    """A whole run: one section per concern, addressed as ``section.key``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and its projection settings."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Steps, batch sizes and the learning-rate schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distribution across ranks."""
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs and logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""

    def validate(self) -> None:
        """Check types and cross-field rules; raise ConfigError listing every problem."""
        problems = _type_problems(self)
        if not problems:
            problems = _rule_problems(self)
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def validate_world_size(cfg: Config, world_size: int) -> int:
    """Check that the global batch splits evenly over the ranks.

    Returns the gradient-accumulation steps: micro-batches per rank per optimizer step.
    """
    t = cfg.training
    per_step = t.micro_batch_size * world_size
    if t.batch_size % per_step:
        raise ConfigError(
            f"training.batch_size ({t.batch_size}) must be divisible by "
            f"training.micro_batch_size ({t.micro_batch_size}) x world size ({world_size}) "
            f"= {per_step}; change either key")
    return t.batch_size // per_step


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < the YAML file at ``path`` < the method preset < ``section.key=value``.

    The method preset is ``optim.name``'s (after ``--set``): the built-in one, then the
    file's ``methods.<name>``. Keys set but unused by the method, and file ``optim:`` keys
    the preset replaces, are reported as a ``ConfigWarning`` (module docstring).
    """
    cfg = Config()
    file_values: dict[str, Any] = {}
    file_presets: dict[str, dict[str, Any]] = {}
    if path is not None:
        file_values, file_presets = _read_yaml(Path(path))
        for key, value in file_values.items():
            _assign(cfg, key, value, source=str(path))
    sets = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = key.strip(), raw.strip()
        sets.append((key, _parse_override(raw), raw))
    for key, value, raw in sets:  # the method first: it picks the preset
        if key == "optim.name":
            _assign(cfg, key, value, source="--set", raw=raw)
    preset = method_preset(cfg.optim.name, file_presets.get(cfg.optim.name, {}))
    for key, value in preset.items():
        _assign(cfg, key, value, source=f"methods.{cfg.optim.name} preset")
    for key, value, raw in sets:
        _assign(cfg, key, value, source="--set", raw=raw)
    _warn_about_keys(cfg, str(path), file_values, preset, {key for key, _, _ in sets})
    _fill_run_dir(cfg)
    _resolve_warmup(cfg.training)
    cfg.validate()
    return cfg


def _resolve_warmup(t: TrainingConfig) -> None:
    """A warmup fraction becomes its step count, and a count the run is too short for
    becomes a tenth of the run (the paper configs' 10%), so a smoke run of a big config
    (``--set training.steps=20``) works; it is named in a ConfigWarning. Values out of
    range stay as they are for the rules to report."""
    warmup, steps = t.warmup_steps, t.steps
    if steps <= 0:
        return
    if isinstance(warmup, float) and 0 <= warmup < 1:
        t.warmup_steps = int(warmup * steps)
    elif isinstance(warmup, int) and warmup >= steps:
        t.warmup_steps = steps // 10
        if os.environ.get("RANK", "0") == "0":
            warnings.warn(f"training.warmup_steps={warmup} is not below training.steps={steps}: "
                          f"warming up for {t.warmup_steps} steps (a tenth of the run) "
                          "instead; set training.warmup_steps to fewer steps or to a "
                          "fraction such as 0.1 to choose", ConfigWarning, stacklevel=3)


def method_preset(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``optim.name``'s preset as {"section.key": value}: built in, then ``extra`` (a
    file's ``methods.<name>``, already checked by ``_read_yaml``)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    merged = {**METHOD_PRESETS.get(name, {}), **(extra or {})}
    return {_preset_dotted(key): value for key, value in merged.items()}


def method_optim_config(name: str, **overrides: Any) -> OptimConfig:
    """``OptimConfig`` of method ``name`` with its built-in preset, then ``overrides``
    (optim keys), for code that builds an optimizer without a config file. Preset keys
    of other sections (``parallel.lowrank_comm``) are not part of an OptimConfig."""
    cfg = Config()
    cfg.optim.name = name
    for key, value in method_preset(name).items():
        if key.startswith("optim."):
            _assign(cfg, key, value, source=f"methods.{name} preset")
    for key, value in overrides.items():
        _assign(cfg, f"optim.{key}", value, source=f"method_optim_config({name!r})")
    return cfg.optim


def unused_optim_keys(optim: OptimConfig) -> set[str]:
    """``optim`` keys (without the section) that the configured method does not read."""
    used = {"name", "lr", "weight_decay", "beta1", "beta2", "eps", "nonfinite"}
    if optim.name in PROJECTED_OPTIMIZERS:
        used |= {"rank", "scale", "proj_type", "projection", "switch", "moments",
                 "recovery_scaling", "per_layer", "projected_backward", "target_modules"}
        used |= {"update_proj_gap"} if optim.switch == "fixed" else {"gamma", "verify_gap",
                                                                     "min_gap"}
        used |= {"power_iters", "oversample"} if optim.projection == "rsvd" else set()
        used |= {"walk_step"} if optim.projection == "grassmann" else set()
        used |= {"recovery_limiter"} if optim.recovery_scaling else set()
    if optim.name == "rso":
        used |= {"rank", "update_proj_gap", "proximal", "target_modules"}
    return set(_keys("optim")) - used


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the config (for config.yaml and summaries); loads back as is.

    Besides one entry per section, ``methods.<optim.name>`` holds the built-in preset's
    keys with the values that run: loading the dict applies that preset over its own
    ``optim`` section, and this entry makes it a no-op (a ``--set`` that beat the preset
    would otherwise be lost)."""
    out = {section: {_key(attr): value for attr, value in values.items()}
           for section, values in dataclasses.asdict(cfg).items()}
    preset = {}
    for key in METHOD_PRESETS.get(cfg.optim.name, {}):
        section, _, leaf = _preset_dotted(key).partition(".")
        preset[key] = out[section][leaf]
    out["methods"] = {cfg.optim.name: preset}
    return out


def config_help() -> str:
    """One entry per key: name, type, default and the field's docstring; then one entry per
    method preset (``methods.<name>``) with its values and their source."""
    lines = []
    for section in dataclasses.fields(Config):
        section_cls = _hints(Config)[section.name]
        docs, hints, defaults = _attribute_docs(section_cls), _hints(section_cls), section_cls()
        for f in dataclasses.fields(section_cls):
            hint, default = hints[f.name], getattr(defaults, f.name)
            lines.append(f"{section.name}.{_key(f.name)} ({_describe(hint)}, default "
                         f"{default!r})")
            lines.append(f"    {docs.get(f.name, '')}")
    for name in METHODS:
        values = ", ".join(f"{k}={v!r}" for k, v in METHOD_PRESETS.get(name, {}).items())
        lines.append(f"methods.{name} (preset of optim.name={name}: {values or 'none'})")
        lines.append(f"    {METHOD_SOURCES.get(name, 'No built-in values.')}")
    return "\n".join(lines)


def _warn_about_keys(cfg: Config, path: str, file_values: dict[str, Any],
                     preset: dict[str, Any], set_keys: set[str]) -> None:
    """One ConfigWarning for keys set but unused by the method, one for file ``optim:``
    keys that the preset replaced (a --set of the key silences both of its own). Only
    rank 0 of a job warns: every rank loads the same config."""
    if os.environ.get("RANK", "0") != "0":
        return
    name, defaults = cfg.optim.name, OptimConfig()
    unused = unused_optim_keys(cfg.optim)
    ignored = [f"optim.{key} (--set)" for key in sorted(unused) if f"optim.{key}" in set_keys]
    ignored += [f"optim.{key} ({path})" for key in sorted(unused)
                if f"optim.{key}" in file_values and f"optim.{key}" not in set_keys
                and getattr(cfg.optim, _attr(key)) != getattr(defaults, _attr(key))]
    if ignored:
        what = ("random subspaces" if name == "rso" else
                "full rank" if name not in PROJECTED_OPTIMIZERS else
                f"projection={cfg.optim.projection}, switch={cfg.optim.switch}, "
                f"recovery_scaling={str(cfg.optim.recovery_scaling).lower()}")
        warnings.warn(f"{', '.join(ignored)}: not used by optim.name={name} ({what}) and "
                      "ignored", ConfigWarning, stacklevel=3)
    replaced = [f"optim.{key[6:]}={file_values[key]!r} -> {preset[key]!r}"
                for key in sorted(preset) if key in file_values and key not in set_keys
                and key.startswith("optim.")
                and _same_type(cfg, key, file_values[key]) != _same_type(cfg, key, preset[key])]
    if replaced:
        warnings.warn(f"{path}: {', '.join(replaced)}: the optim.name={name} preset replaces "
                      f"these file optim keys; put per-method values under methods.{name}, "
                      "or use --set", ConfigWarning, stacklevel=3)


def _same_type(cfg: Config, dotted: str, value: Any) -> Any:
    """``value`` as the field's type (2e-2 -> 0.02), so equal values compare equal."""
    section, _, key = dotted.partition(".")
    try:
        return _coerce(value, _hints(type(getattr(cfg, section)))[_attr(key)])
    except TypeError:
        return value


def _preset_dotted(key: str) -> str:
    """A preset key as "section.key": bare keys are optim keys."""
    return key if "." in key else f"optim.{key}"


# ------------------------------------------------------------------ reading YAML


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Flatten a two-level YAML mapping into {"section.key": value}; the ``methods``
    section comes back apart, checked, as {method: {"section.key": value}}."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from e
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    flat = {}
    for section, values in data.items():
        if values is None or section == "methods":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of keys")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat, _read_methods(path, data.get("methods"))


def _read_methods(path: Path, methods: Any) -> dict[str, dict[str, Any]]:
    """Check a file's ``methods:`` section: known methods, known keys, right types.

    Every method's entry is checked, not only the chosen one's, so a typo fails whichever
    method runs. Messages name the key as written: ``methods.lotus.gama``.
    """
    if methods is None:
        return {}
    if not isinstance(methods, dict):
        raise ConfigError(f"{path}: section 'methods' must map method names to mappings of "
                          "keys")
    out = {}
    for name, entry in methods.items():
        if name not in METHODS:
            close = difflib.get_close_matches(str(name), METHODS, n=1, cutoff=0.6)
            hint = f" (did you mean methods.{close[0]}?)" if close else ""
            raise ConfigError(f"{path}: unknown method methods.{name}{hint}; known: "
                              f"{', '.join(METHODS)}")
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: methods.{name} must be a mapping of keys")
        checked = {}
        for key, value in entry.items():
            where = f"methods.{name}.{key}"
            dotted = _preset_dotted(str(key))
            section_name, _, leaf = dotted.partition(".")
            if dotted == "optim.name":
                raise ConfigError(f"{path}: {where}: a preset cannot change optim.name")
            if section_name not in _SECTIONS or leaf not in _keys(section_name):
                raise ConfigError(f"{path}: unknown key {where}{_preset_suggestion(name, key)}")
            scratch = Config()
            try:
                _assign(scratch, dotted, value, source=str(path))
            except ConfigError:
                hint = _hints(type(getattr(scratch, section_name)))[_attr(leaf)]
                raise ConfigError(f"{path}: {where} expects {_describe(hint)}, got "
                                  f"{value!r}") from None
            checked[str(key)] = getattr(getattr(scratch, section_name), _attr(leaf))
        out[name] = checked
    return out


def _preset_suggestion(name: str, key: Any) -> str:
    """' (did you mean methods.lotus.gamma?)' for a misspelt preset key."""
    candidates = [*_keys("optim"), *(f"{s}.{k}" for s in _SECTIONS if s != "optim"
                                     for k in _keys(s))]
    candidates.remove("name")
    close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
    return f" (did you mean methods.{name}.{close[0]}?)" if close else ""


def _parse_override(raw: str) -> Any:
    """YAML gives --set values their types: 3 -> int, true -> bool, [a,b] -> list."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ------------------------------------------------------------------ assignment


def _assign(cfg: Config, dotted: str, value: Any, source: str, raw: str | None = None) -> None:
    section_name, _, key = dotted.partition(".")
    section = getattr(cfg, section_name, None) if section_name in _SECTIONS else None
    if section is None or key not in _keys(section_name):
        raise ConfigError(f"{source}: unknown key {dotted}{_suggestion(dotted)}")
    hint = _hints(type(section))[_attr(key)]
    try:
        value = _coerce(value, hint)
    except TypeError:
        # A --set value that YAML typed (run.dir=2024 -> int) is still fine as text.
        if raw is None or not _accepts_str(hint):
            raise ConfigError(
                f"{source}: {dotted} expects {_describe(hint)}, got {value!r}") from None
        value = _coerce(raw, hint)
    setattr(section, _attr(key), value)


def _suggestion(dotted: str) -> str:
    """' (did you mean optim.lr?)': a key of that name in another section, or a close one."""
    all_keys = [f"{s}.{k}" for s in _SECTIONS for k in _keys(s)]
    leaf = dotted.rpartition(".")[2]
    close = [k for k in all_keys if k.rpartition(".")[2] == leaf][:1]
    close = close or difflib.get_close_matches(dotted, all_keys, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _fill_run_dir(cfg: Config) -> None:
    """Fill run.dir placeholders such as {model.size} from the config."""
    sections = {name: getattr(cfg, name) for name in _SECTIONS}
    try:
        cfg.run.dir = cfg.run.dir.format(**sections)
    except (KeyError, AttributeError, IndexError, ValueError) as e:
        raise ConfigError(
            f"run.dir {cfg.run.dir!r}: cannot fill placeholder ({e}); "
            "use {section.key}, e.g. runs/{model.size}-{optim.name}") from None


# ------------------------------------------------------------------ types


def _coerce(value: Any, hint: Any) -> Any:
    """Return ``value`` as type ``hint`` or raise TypeError; no lossy conversions."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
    elif origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                try:
                    return _coerce(value, arm)
                except TypeError:
                    pass
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_coerce(v, item) for v in value]
    elif hint is bool or hint is str:
        if isinstance(value, hint):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads 1e-3 (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    raise TypeError(f"{value!r} is not {_describe(hint)}")


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    return typing.get_origin(hint) in (types.UnionType, typing.Union) and str in typing.get_args(
        hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        arms = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(arms) + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return hint.__name__


def _type_problems(cfg: Config) -> list[str]:
    problems = []
    for section_name in _SECTIONS:
        section = getattr(cfg, section_name)
        for key, hint in _hints(type(section)).items():
            value = getattr(section, key)
            try:
                _coerce(value, hint)
            except TypeError:
                problems.append(f"{section_name}.{_key(key)} expects {_describe(hint)}, "
                                f"got {value!r}")
    return problems


# ------------------------------------------------------------------ rules


def _rule_problems(cfg: Config) -> list[str]:
    """Value ranges and cross-field rules, each message naming the keys involved; which
    engine or optimizer supports a setting is ``launcher.capabilities``' table."""
    m, d, o, t, e, p, r, c = (cfg.model, cfg.data, cfg.optim, cfg.training, cfg.eval,
                              cfg.parallel, cfg.run, cfg.checkpoint)
    checks = [
        (m.vocab_size is None or m.vocab_size > 0, "model.vocab_size must be > 0 or null"),
        (t.seq_len <= m.max_seq_len,
         f"training.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})"),
        (bool(d.path), "data.path must not be empty"),
        (bool(d.tokenizer), "data.tokenizer must not be empty"),
        (d.tokenizer_vocab_size >= 256, "data.tokenizer_vocab_size must be >= 256 (bytes)"),
        (d.shuffle_chunk >= 1, "data.shuffle_chunk must be >= 1"),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= o.beta1 < 1, "optim.beta1 must be in [0, 1)"),
        (0 <= o.beta2 < 1, "optim.beta2 must be in [0, 1)"),
        (o.eps > 0, "optim.eps must be > 0"),
        (t.steps > 0, f"training.steps must be > 0, got {t.steps}"),
        (t.batch_size > 0, "training.batch_size must be > 0"),
        (t.micro_batch_size > 0, "training.micro_batch_size must be > 0"),
        (t.micro_batch_size <= 0 or t.batch_size % t.micro_batch_size == 0,
         f"training.batch_size ({t.batch_size}) must be a multiple of "
         f"training.micro_batch_size ({t.micro_batch_size})"),
        (t.seq_len > 0, "training.seq_len must be > 0"),
        (t.seed >= 0, "training.seed must be >= 0"),
        (isinstance(t.warmup_steps, int) and 0 <= t.warmup_steps < t.steps,
         f"training.warmup_steps ({t.warmup_steps}) must be a step count >= 0 and < "
         f"training.steps ({t.steps}), or a fraction of training.steps in [0, 1)"),
        (0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio must be in [0, 1]"),
        (t.grad_clip >= 0, "training.grad_clip must be >= 0 (0 = off)"),
        (t.log_interval >= 1, "training.log_interval must be >= 1"),
        (t.max_skipped_steps >= 0, "training.max_skipped_steps must be >= 0"),
        (t.spike_factor == 0 or t.spike_factor > 1,
         f"training.spike_factor must be > 1 (or 0 = off), got {t.spike_factor}"),
        (0 < t.rollback_lr_factor <= 1, "training.rollback_lr_factor must be in (0, 1]"),
        (t.max_rollbacks >= 0, "training.max_rollbacks must be >= 0"),
        (p.timeout_s > 0, f"parallel.timeout_s must be > 0, got {p.timeout_s}"),
        (e.interval >= 0, "eval.interval must be >= 0 (0 = only at the end)"),
        (e.batches >= 1, "eval.batches must be >= 1"),
        (p.deepspeed_config is None or p.engine == "deepspeed",
         "parallel.deepspeed_config is set but parallel.engine is not deepspeed"),
        (t.dtype != "fp64" or p.mixed_precision != "bf16",
         "training.dtype=fp64 keeps every tensor in float64: set "
         "parallel.mixed_precision=auto or none"),
        (bool(r.dir), "run.dir must not be empty"),
        (c.interval >= 0, "checkpoint.interval must be >= 0 (0 = off)"),
        (c.keep_latest >= 0, "checkpoint.keep_latest must be >= 0 (0 = keep all)"),
        (c.healthy_steps >= 0, "checkpoint.healthy_steps must be >= 0"),
        (bool(c.resume), "checkpoint.resume must be auto, never or a path"),
    ]
    try:
        window = profile_window(t.profile_steps)
    except ConfigError as err:
        checks.append((False, str(err)))
    else:
        checks.append((window is None or window[1] <= t.steps,
                       f"training.profile_steps={t.profile_steps!r} ends after training.steps "
                       f"({t.steps})"))
    if o.name in PROJECTED_OPTIMIZERS:
        checks += [
            (o.rank > 0, f"optim.rank must be > 0 for optim.name={o.name}, got {o.rank}"),
            (o.update_proj_gap >= 1, "optim.update_proj_gap must be >= 1"),
            (o.scale > 0, "optim.scale must be > 0"),
            (o.gamma is None or o.gamma > 0, f"optim.gamma must be > 0, got {o.gamma}"),
            (o.verify_gap >= 1, "optim.verify_gap must be >= 1"),
            (o.min_gap >= 0, "optim.min_gap must be >= 0"),
            (o.power_iters >= 0, "optim.power_iters must be >= 0"),
            (o.oversample >= 0, "optim.oversample must be >= 0"),
            (o.walk_step > 0, "optim.walk_step must be > 0"),
            (o.recovery_limiter >= 1, "optim.recovery_limiter must be >= 1"),
            (bool(o.target_modules), "optim.target_modules must name at least one module"),
        ]
    if o.name == "rso":
        checks += [
            (o.rank > 0, f"optim.rank must be > 0 for optim.name=rso, got {o.rank}"),
            (o.update_proj_gap >= 1, "optim.update_proj_gap must be >= 1"),
            (o.proximal >= 0, f"optim.proximal must be >= 0, got {o.proximal}"),
            (bool(o.target_modules), "optim.target_modules must name at least one module"),
        ]
    return [message for ok, message in checks if not ok]


# ------------------------------------------------------------------ introspection


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys(section_name: str) -> list[str]:
    return [_key(f.name) for f in dataclasses.fields(_hints(Config)[section_name])]


def _key(attr: str) -> str:
    """The config key of a field: a Python keyword (``async``) is spelled ``async_`` in
    the dataclass and without the underscore everywhere a user sees it."""
    stem = attr.removesuffix("_")
    return stem if keyword.iskeyword(stem) else attr


def _attr(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, following in itertools.pairwise(body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)):
            docs[stmt.target.id] = str(following.value.value)
    return docs


_SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def clips_consumed(cfg: Config) -> bool:
    """Whether ``training.clip_on`` (auto resolved) clips on the consumed norm."""
    if cfg.training.clip_on != "auto":
        return cfg.training.clip_on == "consumed"
    return cfg.optim.name in PROJECTED_OPTIMIZERS and cfg.parallel.engine != "deepspeed"


def profile_window(steps: str | list[int]) -> tuple[int, int] | None:
    """``training.profile_steps`` as (first, last) optimizer step, inclusive; None when
    off. Anything but two steps 1 <= N <= M is a ConfigError naming the key."""
    if steps in ("", []):
        return None
    try:
        first, last = (int(part) for part in (steps.split(",") if isinstance(steps, str)
                                               else steps))
    except ValueError:
        raise ConfigError(f"training.profile_steps expects two optimizer steps, \"N,M\" or "
                          f"[N, M], got {steps!r}") from None
    if not 1 <= first <= last:
        raise ConfigError(f"training.profile_steps={steps!r} needs 1 <= N <= M (steps count "
                          "from 1)")
    return first, last
