"""`lotus-train export`: a run's checkpoint as a Hugging Face ``LlamaForCausalLM`` folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

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
    model_cfg = dataclasses.replace(MODEL_SIZES[cfg.model.size],
                                    vocab_size=_stored_vocab_size(path),
                                    max_seq_len=cfg.model.max_seq_len)
    model = build_model_on_meta(model_cfg)
    model.to_empty(device="cpu")  # every weight is overwritten by the load
    checkpoint.load_model_weights(path, model)
    return export_hf(model, out_dir, DTYPES[dtype])


def _stored_vocab_size(path: Path) -> int:
    try:
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # whatever the reader raises, the checkpoint is unusable
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
    entry = meta.get("model.embed_tokens.weight")
    if entry is None:
        raise CheckpointError(f"checkpoint {path} holds no DCP model weights (a "
                              "parallel.engine=deepspeed checkpoint keeps them in its own "
                              "format); export is available for ddp and fsdp checkpoints")
    return int(entry.size[0])
