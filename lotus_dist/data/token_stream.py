"""Documents as one endless token sequence: each tokenized, EOS appended, epochs back to back."""

from collections.abc import Iterator
from typing import Any

from lotus_dist.data.sources import DocumentSource, Position
from lotus_dist.data.tokenizer import TextTokenizer

# Documents tokenized per call: `encode_batch` runs them in parallel threads.
_ENCODE_BATCH = 64


class TokenStream:
    """Hands out tokens in order; its state is a source position plus a partial document.

    The state holds the position after the last document handed out, whole or in
    part, and `carry`, the tokens of that document not yet handed out. Documents
    tokenized ahead are not part of the state: they are read again after a restore.
    """

    def __init__(self, source: DocumentSource, tokenizer: TextTokenizer, repeat: bool) -> None:
        self._source = source
        self._tokenizer = tokenizer
        self._repeat = repeat
        self.restore({"epoch": 0, "source": None, "carry": []})

    def state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "source": self._position, "carry": list(self._carry)}

    def restore(self, state: dict[str, Any]) -> None:
        self._epoch = state["epoch"]
        self._position = state["source"]
        self._carry = [int(token) for token in state["carry"]]
        self._source.seek(self._position)
        self._documents = self._tokenized_documents(self._epoch)

    def take(self, n: int) -> list[int]:
        """The next `n` tokens; fewer only where a non-repeating stream ends."""
        tokens, self._carry = self._carry[:n], self._carry[n:]
        while len(tokens) < n:
            document = next(self._documents, None)
            if document is None:
                break
            ids, self._epoch, self._position = document
            needed = n - len(tokens)
            tokens += ids[:needed]
            self._carry = ids[needed:]
        return tokens

    def _tokenized_documents(self, epoch: int) -> Iterator[tuple[list[int], int, Position]]:
        """(ids + [EOS], epoch, position after the document), passing into new epochs."""
        while True:
            texts, positions = [], []
            for text in self._source:
                texts.append(text)
                positions.append(self._source.position())
                if len(texts) == _ENCODE_BATCH:
                    yield from self._encode(texts, positions, epoch)
                    texts, positions = [], []
            yield from self._encode(texts, positions, epoch)
            if not self._repeat:
                return
            epoch += 1
            self._source.seek(None)

    def _encode(
        self, texts: list[str], positions: list[Position], epoch: int
    ) -> Iterator[tuple[list[int], int, Position]]:
        if not texts:
            return
        for ids, position in zip(self._tokenizer.encode_batch(texts), positions, strict=True):
            ids.append(self._tokenizer.eos_id)
            yield ids, epoch, position
