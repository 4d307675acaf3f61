"""The lotus-train data, tokenizer and config commands."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from launcher.cli import main
from launcher.config import Config
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


def test_config_list_documents_every_key(capsys):
    main(["config", "--list"])
    out = capsys.readouterr().out
    cfg = Config()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"{section.name}.{f.name.rstrip('_')} (" in out  # async_ is async
    assert "methods.galore (preset of optim.name=galore" in out


def test_config_show_prints_what_would_run(capsys):
    main(["config", "--show", "--config", "configs/tiny.yaml", "--set", "optim.name=galore"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["name"] == "galore"
    assert (shown["optim"]["projection"], shown["optim"]["switch"]) == ("svd", "fixed")
    with pytest.raises(SystemExit, match=r"unknown key optim\.rnak"):
        main(["config", "--show", "--set", "optim.rnak=3"])
