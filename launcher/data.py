"""Build this rank's training and evaluation batches from the config."""

from __future__ import annotations

from pathlib import Path

from launcher.config import Config, ConfigError
from launcher.distributed import DistInfo
from lotus_dist.data import (
    EvalBatches,
    PackedBatches,
    TextTokenizer,
    ensure_sample_assets,
    eval_batches,
    load_tokenizer,
    open_documents,
)

SAMPLE_DIR = Path("data/sample")


def build_data(cfg: Config, dist_info: DistInfo) -> tuple[PackedBatches, EvalBatches, int]:
    """Return (train batches, eval batches, model vocabulary size).

    The embedded sample corpus and its tokenizer are built on first use when
    ``data.path`` is the default folder, so the default run needs no download. Every
    problem (missing path, empty corpus, tokenizer/vocab mismatch) surfaces here, before
    the model is built. ``data.on_error`` applies to both splits: what they skip is
    ``train.skipped_records`` / ``train.data_errors`` (live, saved with the loader
    state) and ``evals.skipped_records`` / ``evals.data_errors`` (read once, here).
    """
    d, t = cfg.data, cfg.training
    if Path(d.path) == SAMPLE_DIR:
        ensure_sample_assets(d.path, d.tokenizer, vocab_size=d.tokenizer_vocab_size)
    tokenizer = load_tokenizer(d.tokenizer)
    vocab_size = model_vocab_size(cfg, tokenizer)
    train = PackedBatches(open_documents(d.path, "train", d.on_error), tokenizer, t.seq_len,
                          t.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                          seed=t.seed, shuffle_chunk=d.shuffle_chunk, shuffle=d.shuffle)
    evals = eval_batches(d.path, tokenizer, t.seq_len, t.batch_size, cfg.eval.batches,
                         rank=dist_info.rank, world_size=dist_info.world_size,
                         on_error=d.on_error)
    return train, evals, vocab_size


def model_vocab_size(cfg: Config, tokenizer: TextTokenizer) -> int:
    """``model.vocab_size``, or the tokenizer's when unset.

    A set value must cover every id ordinary text can produce: the tokenizer's base
    vocabulary and its EOS. Added special tokens above it (t5-base's 100 sentinels,
    which GaLore's 32000-id configs leave out) are allowed to fall outside.
    """
    if cfg.model.vocab_size is None:
        return tokenizer.vocab_size
    base = tokenizer.tokenizer.get_vocab_size(with_added_tokens=False)
    needed = max(base, tokenizer.eos_id + 1)
    if cfg.model.vocab_size < needed:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({needed} ids, data.tokenizer={cfg.data.tokenizer!r}); set "
            "model.vocab_size to at least that, or null to take the tokenizer's")
    return cfg.model.vocab_size
