"""Data: C4-layout corpora, tokenizers, prepared token stores, and batches that resume
exactly on any world size."""

from lotus_dist.data.assets import ensure_sample_assets
from lotus_dist.data.loader import (
    DEFAULT_SHUFFLE_CHUNK,
    EvalBatches,
    PackedBatches,
    build_train_batches,
    eval_batches,
)
from lotus_dist.data.prefetch import Prefetcher
from lotus_dist.data.prepare import DEFAULT_SHARD_TOKENS, PrepareInterrupted, prepare_store
from lotus_dist.data.sample import sample_corpus_complete, write_sample_corpus
from lotus_dist.data.sources import (
    MAX_ERRORS_KEPT,
    DataError,
    DataWarning,
    DocumentSource,
    HubDocuments,
    LocalDocuments,
    open_documents,
)
from lotus_dist.data.store import (
    STORE_MANIFEST,
    STORE_TOKENIZER,
    StoreBatches,
    TokenStore,
    is_token_store,
    is_unfinished_store,
    open_store,
    store_eval_batches,
    store_train_batches,
    tokenizer_fingerprint,
)
from lotus_dist.data.tokenizer import EOS_TOKEN, TextTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "DEFAULT_SHUFFLE_CHUNK",
    "EOS_TOKEN",
    "MAX_ERRORS_KEPT",
    "STORE_MANIFEST",
    "STORE_TOKENIZER",
    "DataError",
    "DataWarning",
    "DocumentSource",
    "EvalBatches",
    "HubDocuments",
    "LocalDocuments",
    "PackedBatches",
    "Prefetcher",
    "PrepareInterrupted",
    "StoreBatches",
    "TextTokenizer",
    "TokenStore",
    "build_train_batches",
    "ensure_sample_assets",
    "eval_batches",
    "is_token_store",
    "is_unfinished_store",
    "load_tokenizer",
    "open_documents",
    "open_store",
    "prepare_store",
    "sample_corpus_complete",
    "store_eval_batches",
    "store_train_batches",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "write_sample_corpus",
]
