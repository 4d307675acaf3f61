"""Build this rank's training and evaluation batches from the config."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from launcher.config import Config, ConfigError, DataConfig
from launcher.distributed import DistInfo
from lotus_dist.data import (
    STORE_TOKENIZER,
    DataError,
    EvalBatches,
    PackedBatches,
    Prefetcher,
    StoreBatches,
    TextTokenizer,
    TokenStore,
    ensure_sample_assets,
    eval_batches,
    is_token_store,
    is_unfinished_store,
    load_tokenizer,
    open_documents,
    open_store,
    store_eval_batches,
    store_train_batches,
)

SAMPLE_DIR = Path("data/sample")
SAMPLE_TOKENIZER = SAMPLE_DIR / "tokenizer.json"
PREFETCH_DEPTH = 2
"""Global batches staged ahead of the training loop (by a background thread)."""
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0
"""How long a connection to the hub may take before the hub counts as unreachable."""
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")


def build_sample_if_default(d: DataConfig) -> None:
    """Build the embedded sample corpus (and its tokenizer) on first use when
    ``data.path`` is the default folder. The sample tokenizer is built at its own path
    only: a mistyped ``data.tokenizer`` is a missing-file error when it is loaded, not a
    new tokenizer trained at the typo."""
    if Path(d.path) != SAMPLE_DIR:
        return
    own = Path(d.tokenizer) == SAMPLE_TOKENIZER
    ensure_sample_assets(d.path, d.tokenizer if own else None, vocab_size=d.tokenizer_vocab_size)


def build_data(cfg: Config, dist_info: DistInfo) -> tuple[Prefetcher, EvalBatches, int]:
    """Return (train batches, eval batches, model vocabulary size).

    ``data.path`` is a prepared token store (a folder with ``store-manifest.json``, see
    ``lotus-train data prepare``): every rank memory-maps it and reads only its rows;
    or a C4-layout folder / hub name, streamed and tokenized as it is read (every rank
    tokenizes the whole global stream: O(world size) per rank). Either way a background
    thread stages the next batches (pinned on CUDA); the result is a ``Prefetcher``
    with PackedBatches' protocol.

    Every problem (missing path, empty corpus, tokenizer/vocab mismatch, a store's missing
    or truncated shard or missing split, a store too small for one batch, an unreachable
    hub) surfaces here, before the model is built (see ``open_data``). ``data.on_error``
    applies to both splits: what they skip is ``train.skipped_records`` /
    ``train.data_errors`` (live, saved with the loader state; a store's come from its
    manifest) and ``evals.skipped_records`` / ``evals.data_errors`` (read once, here).
    """
    d, t = cfg.data, cfg.training
    tokenizer, store, vocab_size = open_data(cfg)
    rank, world = dist_info.rank, dist_info.world_size
    train: PackedBatches | StoreBatches
    if store is not None:
        train = store_train_batches(store, t.seq_len, t.batch_size, rank, world, seed=t.seed,
                                    shuffle=d.shuffle, vocab_size=vocab_size)
    else:
        train = PackedBatches(open_documents(d.path, "train", d.on_error), tokenizer,
                              t.seq_len, t.batch_size, rank=rank, world_size=world,
                              seed=t.seed, shuffle_chunk=d.shuffle_chunk, shuffle=d.shuffle)
    evals = build_eval_batches(cfg, tokenizer, store, vocab_size, rank, world)
    pin = dist_info.device.type == "cuda"
    return Prefetcher(train, PREFETCH_DEPTH, pin_memory=pin), evals, vocab_size


def open_data(cfg: Config) -> tuple[TextTokenizer, TokenStore | None, int]:
    """(tokenizer, the token store ``data.path`` is or None, model vocabulary size).

    The embedded sample corpus and its tokenizer are built on first use when
    ``data.path`` is the default folder, so the default run needs no download. A hub
    name that the hub cannot serve fails in seconds (``use_offline_hub_if_unreachable``).
    """
    d = cfg.data
    build_sample_if_default(d)
    use_offline_hub_if_unreachable(d)
    if is_unfinished_store(d.path):
        raise DataError(f"data.path={d.path!r} is a token store whose prepare was interrupted: "
                        "run the same lotus-train data prepare command again to finish it")
    is_store = is_token_store(d.path)
    try:
        tokenizer = load_tokenizer(d.tokenizer)
    except FileNotFoundError as e:
        if not is_store:
            raise
        raise DataError(f"{e}; the token store {d.path} holds the tokenizer it was prepared "
                        f"with: set data.tokenizer={Path(d.path) / STORE_TOKENIZER}") from e
    vocab_size = model_vocab_size(cfg, tokenizer)
    store = (open_store(d.path, tokenizer, d.tokenizer, vocab_size, d.on_error) if is_store
             else None)
    return tokenizer, store, vocab_size


def build_eval_batches(cfg: Config, tokenizer: TextTokenizer, store: TokenStore | None,
                       vocab_size: int, rank: int = 0, world_size: int = 1,
                       split: str = "validation") -> EvalBatches:
    """This rank's rows of the first ``eval.batches`` unshuffled global batches of
    ``split``: what the trainer evaluates on, and what ``lotus-train eval`` rebuilds."""
    d, t = cfg.data, cfg.training
    if store is not None:
        return store_eval_batches(store, t.seq_len, t.batch_size, cfg.eval.batches, rank,
                                  world_size, split=split, vocab_size=vocab_size)
    return eval_batches(d.path, tokenizer, t.seq_len, t.batch_size, cfg.eval.batches,
                        rank=rank, world_size=world_size, split=split, on_error=d.on_error)


def use_offline_hub_if_unreachable(d: DataConfig) -> None:
    """Put the hub libraries in offline mode (``HF_HUB_OFFLINE=1``) when ``data.path`` or
    ``data.tokenizer`` is not on this machine and the hub does not accept a connection
    within ``HUB_PROBE_TIMEOUT_S``. Files in the local hub cache still load; anything else
    fails at once with the error that names the fix, not after ~26 s of retries.

    Skipped when offline mode is already chosen, and behind a proxy (a direct connection
    says nothing there). It must run before huggingface_hub is imported, which reads the
    variable once: so it does in ``lotus-train``, whose data code imports it lazily."""
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    if all(Path(value).expanduser().exists() for value in (d.path, d.tokenizer)):
        return
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT)
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


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


def prepare_command(args: argparse.Namespace) -> None:
    """`lotus-train data prepare`: tokenize a corpus into a token store; one summary line."""
    from lotus_dist.data.prepare import prepare_store

    splits = [s for s in args.split.split(",") if s] if args.split else None
    shards = {} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}
    try:
        result = prepare_store(args.data, args.tokenizer, args.out, splits=splits,
                               max_tokens=args.max_tokens, workers=args.workers,
                               on_error=args.on_error, hub_config=args.hub_config, **shards)
    except (FileNotFoundError, ValueError, OSError) as e:  # DataError is a ValueError
        sys.exit(f"lotus-train: error: {e}")
    manifest = result["manifest"]
    parts = [f"{name} {info['tokens']:,} tokens / {info['documents']:,} documents / "
             f"{len(info['shards'])} shard{'s' if len(info['shards']) != 1 else ''} / "
             f"{info['skipped_records']} skipped"
             for name, info in manifest["splits"].items()]
    if result["already_done"]:
        print(f"{args.out} is already a finished token store ({'; '.join(parts)})")
        return
    how = " (resumed)" if result["resumed"] else ""
    print(f"prepared {args.out}{how}: {'; '.join(parts)}; {manifest['dtype']}; "
          f"{result['tokens']:,} tokens in {result['seconds']:.1f} s "
          f"({result['tokens_per_s']:,.0f} tok/s, {result['workers']} workers)")
