"""`lotus-train export`: a run's checkpoint as a Hugging Face ``LlamaForCausalLM`` folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from launcher import checkpoint
from launcher.checkpoint import CheckpointError
from launcher.config import Config, config_to_dict, load_config
from launcher.engines.base import param_dtype
from lotus_dist.data import DataError, TextTokenizer, load_tokenizer
from lotus_dist.hf_export import export_hf
from lotus_dist.model import MODEL_SIZES, Llama, build_model_on_meta
from lotus_dist.rso import fold_rso, install_rso

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_CONFIG = "lotus-config.yaml"
"""The run's config.yaml as an export records it: what trained the weights, and the data
settings ``lotus-train eval --hf`` evaluates with by default."""


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None,
               dtype: str = "float32", tokenizer: str | None = None) -> Path:
    """Export the newest complete checkpoint of ``run_dir`` (or ``step``) to ``out_dir``,
    with the run's tokenizer (``data.tokenizer``, or ``tokenizer``: a tokenizer.json or hub
    name) and the run's config (``RUN_CONFIG``). Works in one process whatever world
    size wrote the checkpoint."""
    cfg, model, _ = load_run_model(run_dir, step)
    tok = _export_tokenizer(tokenizer or cfg.data.tokenizer, model.cfg.vocab_size)
    run_config = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return export_hf(model, out_dir, DTYPES[dtype], tok, {RUN_CONFIG: run_config})


def load_run_model(run_dir: str | Path, step: int | None = None) -> tuple[Config, Llama, Path]:
    """(the run's config, its model on the CPU with the weights of the newest complete
    checkpoint or of ``step``, that checkpoint's path).

    The model shape comes from the run's ``config.yaml``; its vocabulary from the
    checkpoint itself (the trainer takes it from the tokenizer), so no data or tokenizer
    is needed; its dtype is the run's parameter dtype (fp64 for training.dtype=fp64).
    An optim.name=rso checkpoint holds W, B and P: the current period is folded into W
    (W + B P^T, the weights the run's forward used), so the model is a plain ``Llama``.
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config)
    path = find_checkpoint(run_dir / "ckpt", step)
    vocab_size = checkpoint.stored_model_shapes(path)["embed_tokens.weight"][0]
    model_cfg = dataclasses.replace(MODEL_SIZES[cfg.model.size], vocab_size=vocab_size,
                                    max_seq_len=cfg.model.max_seq_len)
    model = build_model_on_meta(model_cfg).to(param_dtype(cfg.training.dtype))
    model.to_empty(device="cpu")  # every weight is overwritten by the load
    model.init_buffers()
    if cfg.optim.name == "rso":
        install_rso(model, cfg.optim.rank, cfg.optim.target_modules)
    checkpoint.load_model_weights(path, model)
    if cfg.optim.name == "rso":
        fold_rso(model)
    return cfg, model, path


def find_checkpoint(ckpt_dir: Path, step: int | None) -> Path:
    """The newest complete checkpoint, or the one of ``step``; the error lists the steps
    that have one."""
    steps = checkpoint.complete_steps(ckpt_dir)
    if step is None and steps:
        return checkpoint.step_dir(ckpt_dir, steps[-1])
    if step in steps:
        return checkpoint.step_dir(ckpt_dir, step)
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    have = (f"complete checkpoints: step {', '.join(map(str, steps))}" if steps
            else "it holds none")
    raise CheckpointError(f"no complete checkpoint at step {step} in {ckpt_dir} ({have})")


def _export_tokenizer(name: str, vocab_size: int) -> TextTokenizer:
    """The tokenizer to ship with the weights; it must fit the model's vocabulary."""
    try:
        tokenizer = load_tokenizer(name)
    except (FileNotFoundError, DataError) as e:
        raise DataError(f"{e}; the export needs the tokenizer the run trained with: pass "
                        "--tokenizer PATH (its tokenizer.json)") from e
    base = tokenizer.tokenizer.get_vocab_size(with_added_tokens=False)
    if max(base, tokenizer.eos_id + 1) > vocab_size:
        raise DataError(f"tokenizer {name!r} has {base} ids but the checkpoint's model "
                        f"{vocab_size}: not the tokenizer this run trained with")
    return tokenizer
