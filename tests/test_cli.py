"""The lotus-train data and tokenizer commands."""

from __future__ import annotations

from launcher.cli import main
from lotus_dist.data import load_tokenizer, sample_corpus_complete


def test_data_sample_then_tokenizer_train(tmp_path, capsys):
    corpus = tmp_path / "sample"
    main(["data", "sample", "--out", str(corpus)])
    assert sample_corpus_complete(corpus)
    out = tmp_path / "tok.json"
    main(["tokenizer", "train", "--data", str(corpus), "--out", str(out), "--vocab-size", "400",
          "--max-docs", "200"])
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == 400
    assert tokenizer.encode_batch(["def f(x): return x"])[0]
    assert "400 ids" in capsys.readouterr().out
