"""`lotus-train tokenizer train`: a byte-level BPE tokenizer from a local corpus."""

from __future__ import annotations

from itertools import islice

from lotus_dist.data import open_documents, train_tokenizer


def train_tokenizer_command(data: str, out: str, vocab_size: int, max_docs: int | None) -> None:
    """Train on the train split of ``data`` (at most ``max_docs`` documents)."""
    docs = open_documents(data, "train")
    tokenizer = train_tokenizer(islice(docs, max_docs), vocab_size, out)
    print(f"wrote {out}: {tokenizer.vocab_size} ids, EOS id {tokenizer.eos_id}")
