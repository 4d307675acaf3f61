"""`lotus-train export`: a run's checkpoint as a Hugging Face ``LlamaForCausalLM`` folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from launcher import checkpoint
from launcher.checkpoint import CheckpointError
from launcher.config import load_config
from lotus_dist.hf_export import export_hf
from lotus_dist.model import MODEL_SIZES, build_model_on_meta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None,
               dtype: str = "float32") -> Path:
    """Export the newest complete checkpoint of ``run_dir`` (or ``step``) to ``out_dir``.

    The model shape comes from the run's ``config.yaml``; its vocabulary from the
    checkpoint itself (the trainer takes it from the tokenizer), so no data or tokenizer
    is needed. Works in one process whatever world size wrote the checkpoint.
    """
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config)
    ckpt_dir = run_dir / "ckpt"
    path = checkpoint.find_latest(ckpt_dir) if step is None else checkpoint.step_dir(ckpt_dir,
                                                                                      step)
    if path is None or not (path / checkpoint.MARKER).is_file():
        raise CheckpointError(f"no complete checkpoint {'in' if step is None else 'at'} "
                              f"{ckpt_dir if path is None else path}")
    vocab_size = checkpoint.stored_model_shapes(path)["embed_tokens.weight"][0]
    model_cfg = dataclasses.replace(MODEL_SIZES[cfg.model.size], vocab_size=vocab_size,
                                    max_seq_len=cfg.model.max_seq_len)
    model = build_model_on_meta(model_cfg)
    model.to_empty(device="cpu")  # every weight is overwritten by the load
    checkpoint.load_model_weights(path, model)
    return export_hf(model, out_dir, DTYPES[dtype])

