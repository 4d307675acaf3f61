"""Tokenizers: a byte-level BPE trained on the sample corpus, or t5-base as in the paper."""

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lotus_dist.data.sources import DataError

EOS_TOKEN = "</s>"
# t5-base's order, so pad, end-of-document and unknown have ids 0, 1, 2 in both.
SPECIAL_TOKENS = ("<pad>", EOS_TOKEN, "<unk>")


class TextTokenizer:
    """What the data pipeline needs from a tokenizer: ids, the EOS id, the vocabulary size."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = EOS_TOKEN) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"the tokenizer of data.tokenizer has no {eos_token!r} token")
        # Special tokens written in a document are text: only the packer marks document
        # ends, and t5-base's sentinels (ids 32000 and up) never come out of plain text.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eos_id: int = eos_id
        # Added tokens count: every id `encode_batch` can return is below this.
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens (t5-base would otherwise append its own EOS)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike
) -> TextTokenizer:
    """Train a byte-level BPE on `texts` and save it atomically as a tokenizer.json.

    Byte-level BPE never needs the unknown token: any text encodes, whatever its script.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 bytes and special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tokenizer.save(str(tmp_path))
    os.replace(tmp_path, out_path)
    return TextTokenizer(tokenizer)


def load_tokenizer(name_or_path: str | os.PathLike, eos_token: str = EOS_TOKEN) -> TextTokenizer:
    """A local tokenizer.json (or a folder holding one), else a Hugging Face hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return TextTokenizer(Tokenizer.from_file(str(path)), eos_token)
    if path.suffix == ".json" or path.is_absolute() or str(name_or_path).startswith((".", "~")):
        raise FileNotFoundError(
            f"data.tokenizer={str(name_or_path)!r}: no such tokenizer.json or folder"
        )
    try:
        tokenizer = Tokenizer.from_pretrained(str(name_or_path))
    except Exception as err:
        raise DataError(
            f"data.tokenizer={str(name_or_path)!r} is not a local tokenizer.json or folder, and "
            f"loading it from the Hugging Face hub failed ({err}). Without network access, "
            "set data.tokenizer to a local tokenizer.json (lotus-train tokenizer train makes "
            "one; lotus-train data prepare stores the one it used)."
        ) from err
    return TextTokenizer(tokenizer, eos_token)
