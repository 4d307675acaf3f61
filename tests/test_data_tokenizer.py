"""Tokenizers: the trained byte-level BPE, loading, and errors that name the config key."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, processors

from launcher.config import DataConfig
from launcher.data import PROXY_VARIABLES
from lotus_dist.data import DataError, TextTokenizer, load_tokenizer, train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the Python representation of the document.",
    "Gradients are projected onto a low-rank subspace.",
    "Ünïcödé and emoji 🦊 still encode: byte-level BPE has no unknown token.",
] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(TEXTS, vocab_size=512, out_path=path)
    return path


def test_trained_tokenizer_round_trips_text_and_has_t5_special_ids(tokenizer_file: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_file)
    assert [tokenizer.tokenizer.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    assert tokenizer.eos_id == 1
    assert 256 < tokenizer.vocab_size <= 512
    ids = tokenizer.encode_batch(TEXTS[:4])
    assert [tokenizer.decode(row) for row in ids] == TEXTS[:4]
    assert all(0 <= i < tokenizer.vocab_size for row in ids for i in row)


def test_loading_a_file_or_its_folder_gives_the_same_tokenizer(tokenizer_file: Path) -> None:
    from_file = load_tokenizer(str(tokenizer_file)).encode_batch(TEXTS[:2])
    assert load_tokenizer(tokenizer_file.parent).encode_batch(TEXTS[:2]) == from_file


def test_encode_batch_adds_no_special_tokens(tokenizer_file: Path, tmp_path: Path) -> None:
    # t5-base's post-processor appends </s>; the packer appends EOS itself.
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    assert tokenizer.encode(TEXTS[0]).ids[-1] == 1
    wrapped = TextTokenizer(tokenizer)
    assert wrapped.encode_batch([TEXTS[0]])[0] == tokenizer.encode(TEXTS[0]).ids[:-1]


def test_special_tokens_written_in_a_document_are_plain_text(tokenizer_file: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_file)
    text = "HTML strikethrough ends with </s>, padding is <pad>."
    ids = tokenizer.encode_batch([text])[0]
    assert not {0, 1, 2} & set(ids)
    assert tokenizer.decode(ids) == text


def test_missing_local_tokenizer_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer="):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")


def test_unreachable_hub_tokenizer_is_an_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # fail now, not after retries
    with pytest.raises(DataError, match=r"data\.tokenizer='lotus-dist/no-such-tokenizer'"):
        load_tokenizer("lotus-dist/no-such-tokenizer")


def test_unreachable_hub_tokenizer_ends_the_run_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path,
) -> None:
    """Offline, a hub tokenizer name (configs/60m.yaml's t5-base) ends the run with one
    'lotus-train: error:' line saying what to use instead, not a traceback."""
    from launcher.train import main

    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the launcher would set it, offline
    with pytest.raises(SystemExit, match=r"^lotus-train: error: data\.tokenizer='lotus-dist/"
                                         r"no-such-tokenizer'.*local tokenizer\.json"):
        main("configs/tiny.yaml", ["data.tokenizer=lotus-dist/no-such-tokenizer",
                                   f"run.dir={tmp_path}"])


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No network: the hub endpoint refuses connections, no proxy, an empty hub cache and
    offline mode not chosen (the launcher has to find out itself)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXY_VARIABLES}}
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home")}


@pytest.mark.parametrize(("overrides", "fix"), [
    ([], r"data\.tokenizer='t5-base'.*set data\.tokenizer to a local tokenizer\.json"),
    (["data.tokenizer={tokenizer}", "model.vocab_size=null"],
     r"data\.path='allenai/c4'.*set data\.path to a local C4-layout folder.*lotus-train data "
     r"prepare"),
])
def test_a_hub_config_without_network_fails_fast_with_one_line(tmp_path, small_corpus,
                                                              overrides, fix):
    """configs/60m.yaml (t5-base, allenai/c4) with no network and HF_HUB_OFFLINE unset: one
    'lotus-train: error:' line naming the fix, in seconds rather than after the hub
    client's ~26 s of retries. The local tokenizer is the test corpus's (a clean clone
    has no data/sample yet)."""
    overrides = [item.format(tokenizer=small_corpus[1]) for item in overrides]
    sets = [f"--set={item}" for item in [f"run.dir={tmp_path / 'run'}", *overrides]]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launcher", "train", "--config",
                           "configs/60m.yaml", *sets], capture_output=True, text=True,
                          env=offline_env(tmp_path), timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lotus-train: error: "), done.stderr
    assert re.search(fix, last), last
    assert elapsed < 20, f"{elapsed:.1f} s"  # the retries alone take 23 s


def test_offline_mode_is_chosen_only_when_the_hub_is_needed_and_unreachable(monkeypatch):
    from launcher import data

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("no network")

    monkeypatch.setattr(data.socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # unset to the launcher, restored afterwards
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    local = DataConfig(path="data", tokenizer="configs")  # both exist: no probe needed
    data.use_offline_hub_if_unreachable(local)
    assert os.environ["HF_HUB_OFFLINE"] == ""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a direct probe proves nothing
    data.use_offline_hub_if_unreachable(DataConfig(tokenizer="t5-base"))
    assert os.environ["HF_HUB_OFFLINE"] == ""
    monkeypatch.delenv("HTTPS_PROXY")
    data.use_offline_hub_if_unreachable(DataConfig(tokenizer="t5-base"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tokenizer_without_eos_is_refused() -> None:
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match=r"data\.tokenizer.*'</s>'"):
        TextTokenizer(tokenizer)


def test_vocab_smaller_than_the_byte_alphabet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(TEXTS, vocab_size=100, out_path=tmp_path / "tokenizer.json")
