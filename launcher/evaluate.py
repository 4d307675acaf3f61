"""`lotus-train eval`: validation loss and perplexity of a run's checkpoint or an HF export.

The batches and the loss are the trainer's own (``launcher.data.build_eval_batches``,
``launcher.trainer.eval_loss_sums``), so evaluating a run's last checkpoint with the run's
settings reproduces the final ``eval_loss`` of its ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from launcher.config import Config, ConfigError, load_config
from launcher.data import build_eval_batches, open_data
from launcher.engines.base import param_dtype
from launcher.export import RUN_CONFIG, load_run_model
from launcher.trainer import compute_autocast, eval_loss_sums, eval_metrics
from lotus_dist.hf_export import is_hf_folder, load_hf
from lotus_dist.model import Llama


def evaluate(run: str | None = None, hf: str | None = None, step: int | None = None,
             data: str | None = None, tokenizer: str | None = None, split: str = "validation",
             batches: int | None = None, overrides: list[str] | tuple[str, ...] = (),
             progress: bool = True) -> dict[str, Any]:
    """Evaluate a run's checkpoint (``run``, newest complete one or ``step``) or an HF
    folder (``hf``; a ``run`` that is one is taken as ``hf``) on ``split``.

    The data settings are the run's ``config.yaml`` (an export's ``lotus-config.yaml``;
    the defaults for a foreign HF folder), then ``data`` (data.path), ``tokenizer``
    (data.tokenizer; an HF folder's own tokenizer.json by default), ``batches``
    (eval.batches) and ``overrides`` (``section.key=value``, as ``--set``).
    """
    if hf is None and run is not None and _is_export(Path(run)):
        run, hf = None, run
    if hf is not None:
        if step is not None:
            raise ConfigError("--step selects a checkpoint of --run; an HF folder holds one "
                              "model")
        folder = Path(hf)
        model, source = load_hf(folder), str(folder)
        base = folder / RUN_CONFIG if (folder / RUN_CONFIG).is_file() else None
        own_tokenizer = folder / "tokenizer.json"
        tokenizer = tokenizer or (str(own_tokenizer) if own_tokenizer.is_file() else None)
        if base is None and (data is None or tokenizer is None):
            raise ConfigError(f"{folder} records no run config ({RUN_CONFIG}): pass --data and "
                              "--tokenizer (the corpus and tokenizer.json to evaluate with)")
    else:
        base = Path(run) / "config.yaml"
        _, model, path = load_run_model(run, step)
        source, step = str(path), int(path.name.removeprefix("step-"))
    sets = [f"model.vocab_size={model.cfg.vocab_size}",
            f"model.max_seq_len={model.cfg.max_seq_len}"]
    sets += [f"{key}={value}" for key, value in (("data.path", data),
                                                  ("data.tokenizer", tokenizer),
                                                  ("eval.batches", batches)) if value is not None]
    cfg = load_config(base, [*sets, *overrides])
    result = evaluate_model(model, cfg, split, progress)
    return {**result, "source": source, "step": step, "split": split}


def evaluate_model(model: Llama, cfg: Config, split: str = "validation",
                   progress: bool = True) -> dict[str, Any]:
    """``eval_loss``, ``eval_ppl`` and ``tokens`` of ``model`` on ``cfg``'s eval batches of
    ``split``, in one process (on the GPU when there is one, else the CPU)."""
    tokenizer, store, vocab_size = open_data(cfg)
    evals = build_eval_batches(cfg, tokenizer, store, vocab_size, split=split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=param_dtype(cfg.training.dtype))
    bar = tqdm(evals, desc=f"eval {split}", unit="batch", file=sys.stderr, disable=not progress)
    total = eval_loss_sums(model, bar, cfg.training.micro_batch_size, device,
                           compute_autocast(cfg.training.dtype, device))
    loss_sum, count = total.tolist()
    return {**eval_metrics(loss_sum, count), "tokens": int(count), "batches": len(evals)}


def eval_command(args: Any) -> None:
    """The CLI's `eval`: one summary line, then the result as a JSON line."""
    result = evaluate(args.run, args.hf, args.step, args.data, args.tokenizer, args.split,
                      args.batches, args.overrides)
    at = f" (step {result['step']})" if result["step"] is not None else ""
    print(f"eval {result['source']}{at} on {result['split']}: loss {result['eval_loss']:.4f}, "
          f"perplexity {result['eval_ppl']:.2f} over {result['tokens']:,} tokens "
          f"({result['batches']} batches)")
    print(json.dumps(result))


def _is_export(path: Path) -> bool:
    """An HF folder rather than a run directory (which has a config.yaml)."""
    return is_hf_folder(path) and not (path / "config.yaml").is_file()
