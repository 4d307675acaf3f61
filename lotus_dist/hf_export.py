"""Export a trained ``Llama`` as a Hugging Face ``LlamaForCausalLM`` folder, and load one back.

Our module names are HF's, and our rotary embedding uses HF's ``rotate_half`` layout, so the
export is a rename (prefix ``model.`` on everything but ``lm_head``) with no weight permutation.
With the tokenizer, the folder also holds ``tokenizer.json``, ``tokenizer_config.json`` and
``generation_config.json``, so ``AutoTokenizer.from_pretrained`` and ``model.generate`` work.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.tensor import DTensor

from lotus_dist.comm import barrier
from lotus_dist.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from lotus_dist.model import INIT_STD, Llama, LlamaConfig, build_model_on_meta, canonical_name

WEIGHTS = "model.safetensors"


class HFFolderError(ValueError):
    """A folder that is not a single-file ``LlamaForCausalLM`` of a shape ``Llama`` has."""


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


def hf_config(model: Llama, dtype: torch.dtype = torch.float32,
              tokenizer: TextTokenizer | None = None) -> dict:
    """The ``config.json`` contents that make HF rebuild this architecture exactly (with
    the tokenizer's special ids; HF's defaults, bos 1 and eos 2, would be wrong)."""
    cfg = model.cfg
    return {
        **(special_token_ids(tokenizer) if tokenizer is not None else {}),
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


def special_token_ids(tokenizer: TextTokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids as HF configs name them. Documents are packed with the EOS after
    each one and no BOS (``lotus_dist.data``), so there is no BOS; padding is ``<pad>``
    where the tokenizer has it, else the EOS."""
    pad = tokenizer.tokenizer.token_to_id(SPECIAL_TOKENS[0])
    return {"bos_token_id": None, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.eos_id if pad is None else pad}


def hf_tokenizer_config(tokenizer: TextTokenizer, max_seq_len: int) -> dict[str, Any]:
    """``tokenizer_config.json``: a fast tokenizer over ``tokenizer.json`` with the data
    pipeline's special tokens, so ``AutoTokenizer`` encodes and decodes as training did."""
    tok = tokenizer.tokenizer
    specials = {"eos_token": tok.id_to_token(tokenizer.eos_id)}
    for key, token in (("pad_token", SPECIAL_TOKENS[0]), ("unk_token", SPECIAL_TOKENS[2])):
        if tok.token_to_id(token) is not None:
            specials[key] = token
    return {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
            "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}


def export_hf(model: Llama, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
              tokenizer: TextTokenizer | None = None,
              extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` loadable by ``LlamaForCausalLM``;
    with ``tokenizer``, its files and ``generation_config.json`` too; ``extra_files``
    (name -> text) are written alongside (the launcher records the run's config there).

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
        _write(model, tensors, out_dir, dtype, tokenizer, extra_files or {})
    if distributed:
        barrier()  # on every rank, the export is on disk when this returns
    return out_dir


def _write(model: Llama, tensors: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype,
           tokenizer: TextTokenizer | None, extra_files: Mapping[str, str]) -> None:
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # stale, from a crashed export
    tmp_dir.mkdir(parents=True)
    try:
        save_file(tensors, tmp_dir / WEIGHTS, metadata={"format": "pt"})
        _write_json(tmp_dir / "config.json", hf_config(model, dtype, tokenizer))
        if tokenizer is not None:
            tokenizer.tokenizer.save(str(tmp_dir / "tokenizer.json"))
            _write_json(tmp_dir / "tokenizer_config.json",
                        hf_tokenizer_config(tokenizer, model.cfg.max_seq_len))
            _write_json(tmp_dir / "generation_config.json", special_token_ids(tokenizer))
        for name, text in extra_files.items():
            (tmp_dir / name).write_text(text)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an HF model folder (``config.json`` + ``model.safetensors``)."""
    return (Path(path) / "config.json").is_file() and (Path(path) / WEIGHTS).is_file()


def load_hf(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Llama:
    """A ``Llama`` with the weights of an HF ``LlamaForCausalLM`` folder (ours or any
    single-file one of the same architecture), on the CPU in ``dtype``; the inverse of
    ``export_hf``. Raises HFFolderError naming what does not fit."""
    folder = Path(folder)
    if not is_hf_folder(folder):
        raise HFFolderError(f"{folder} is not a Hugging Face model folder (needs config.json and "
                            f"{WEIGHTS}; sharded checkpoints are not supported)")
    model = build_model_on_meta(llama_config(json.loads((folder / "config.json").read_text()),
                                             folder)).to(dtype)
    model.to_empty(device="cpu")
    model.init_buffers()
    try:
        hf = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise HFFolderError(f"{folder / WEIGHTS} cannot be read: {e}") from e
    ours = {name.removeprefix("model."): tensor for name, tensor in hf.items()}
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = sorted(k for k in expected.keys() | ours.keys()
                   if k not in ours or expected.get(k) != tuple(ours[k].shape))
    if wrong:
        raise HFFolderError(f"{folder / WEIGHTS} does not match its config.json (missing, "
                            f"unexpected or misshapen: {', '.join(wrong[:5])}"
                            f"{', ...' if len(wrong) > 5 else ''})")
    model.load_state_dict(ours)
    return model


def llama_config(hf: dict[str, Any], folder: Path) -> LlamaConfig:
    """Our ``LlamaConfig`` of an HF ``config.json``; refuses what ``Llama`` does not model."""
    heads = hf.get("num_attention_heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    problems = [
        (hf.get("model_type") != "llama", f"model_type {hf.get('model_type')!r} is not 'llama'"),
        (hf.get("num_key_value_heads", heads) != heads, "grouped-query attention"),
        (bool(hf.get("tie_word_embeddings")), "tied input and output embeddings"),
        (bool(hf.get("attention_bias") or hf.get("mlp_bias")), "biases"),
        (rope.get("rope_type", "default") != "default", f"rope scaling {rope.get('rope_type')}"),
    ]
    refused = [what for bad, what in problems if bad]
    if refused:
        raise HFFolderError(f"{folder}/config.json: {', '.join(refused)}: not the LLaMA "
                            "architecture lotus_dist.model implements")
    try:
        cfg = LlamaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                          intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                          max_seq_len=hf["max_position_embeddings"],
                          norm_eps=hf.get("rms_norm_eps", 1e-6),
                          rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise HFFolderError(f"{folder}/config.json: {e!r} (missing or invalid)") from e
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise HFFolderError(f"{folder}/config.json: head_dim {hf['head_dim']} is not "
                            f"hidden_size / num_attention_heads = {cfg.head_dim}")
    return cfg


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
