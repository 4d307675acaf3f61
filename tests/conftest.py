"""Shared fixtures: a small C4-layout corpus and tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lotus_dist.data import LocalDocuments, train_tokenizer, write_sample_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus folder, tokenizer.json): ~300 kB of stdlib docstrings, a 512-id BPE."""
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "c4"
    write_sample_corpus(corpus, max_bytes=300_000)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(LocalDocuments(corpus, "train"), 512, tokenizer)
    return corpus, tokenizer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, with the reason, where torch sees no GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
