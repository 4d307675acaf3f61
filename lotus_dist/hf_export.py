"""Export a trained ``Llama`` as a Hugging Face ``LlamaForCausalLM`` folder.

Our module names are HF's, and our rotary embedding uses HF's ``rotate_half`` layout, so the
export is a rename (prefix ``model.`` on everything but ``lm_head``) with no weight permutation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor
from torch.distributed.tensor import DTensor

from lotus_dist.comm import barrier
from lotus_dist.model import INIT_STD, Llama, canonical_name


def hf_key(name: str) -> str:
    """HF ``LlamaForCausalLM`` key of one of our parameter names (wrappers are ignored)."""
    name = canonical_name(name)
    return name if name.startswith("lm_head.") else f"model.{name}"


def _hf_tensors(model: Llama) -> Iterator[tuple[str, Tensor]]:
    """(HF key, full tensor) pairs in state-dict order; gathers FSDP shards one at a time."""
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield hf_key(name), tensor.detach()


def hf_state_dict(model: Llama) -> dict[str, Tensor]:
    """The model's weights under HF keys, unsharded (a collective when the model is sharded)."""
    return dict(_hf_tensors(model))


def hf_config(model: Llama, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` contents that make HF rebuild this architecture exactly."""
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(model: Llama, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` and ``model.safetensors`` loadable by ``LlamaForCausalLM``.

    Under FSDP call it on every rank (gathering shards is collective); only rank 0 writes,
    holding one gathered tensor at a time on the other ranks. The folder appears complete or
    not at all: files go to a sibling temp folder that is renamed into place, replacing any
    previous export.
    """
    out_dir = Path(out_dir)
    distributed = dist.is_available() and dist.is_initialized()
    writer = not distributed or dist.get_rank() == 0
    tensors = {}
    for key, tensor in _hf_tensors(model):  # every rank iterates: the gathers are collective
        if writer:
            tensors[key] = tensor.to(device="cpu", dtype=dtype).contiguous()
    if writer:
        _write(model, tensors, out_dir, dtype)
    if distributed:
        barrier()  # on every rank, the export is on disk when this returns
    return out_dir


def _write(model: Llama, tensors: dict[str, torch.Tensor], out_dir: Path,
           dtype: torch.dtype) -> None:
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # stale, from a crashed export
    tmp_dir.mkdir(parents=True)
    try:
        save_file(tensors, tmp_dir / "model.safetensors", metadata={"format": "pt"})
        config_text = json.dumps(hf_config(model, dtype), indent=2) + "\n"
        (tmp_dir / "config.json").write_text(config_text)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst is moved aside first (rename cannot overwrite it)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)
