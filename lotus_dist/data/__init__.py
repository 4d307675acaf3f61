"""Data: C4-layout corpora, tokenizers, and packed batches that resume on any world size."""

from lotus_dist.data.assets import ensure_sample_assets
from lotus_dist.data.loader import (
    DEFAULT_SHUFFLE_CHUNK,
    EvalBatches,
    PackedBatches,
    build_train_batches,
    eval_batches,
)
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
from lotus_dist.data.tokenizer import EOS_TOKEN, TextTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_SHUFFLE_CHUNK",
    "EOS_TOKEN",
    "MAX_ERRORS_KEPT",
    "DataError",
    "DataWarning",
    "DocumentSource",
    "EvalBatches",
    "HubDocuments",
    "LocalDocuments",
    "PackedBatches",
    "TextTokenizer",
    "build_train_batches",
    "ensure_sample_assets",
    "eval_batches",
    "load_tokenizer",
    "open_documents",
    "sample_corpus_complete",
    "train_tokenizer",
    "write_sample_corpus",
]
