"""Documents as one endless token sequence: each tokenized, EOS appended, epochs back to back."""

from collections.abc import Iterator
from typing import Any

from lotus_dist.data.sources import DocumentSource, Position
from lotus_dist.data.tokenizer import TextTokenizer

# Documents tokenized per call: `encode_batch` runs them in parallel threads.
_ENCODE_BATCH = 64

# (ids + [EOS], epoch, source position after the document, source.skipped then)
_Document = tuple[list[int], int, Position, int]


class TokenStream:
    """Hands out tokens in order; its state is a source position plus a partial document.

    The state holds the position after the last document handed out, whole or in
    part, `carry`, the tokens of that document not yet handed out, and
    `skipped_records`, the bad records the source had skipped when it reached that
    position. Documents tokenized ahead are not part of the state: they are read again
    after a restore, and the skips among them counted again from the restored count,
    so the count after a resume equals the uninterrupted run's.
    """

    def __init__(self, source: DocumentSource, tokenizer: TextTokenizer, repeat: bool) -> None:
        self._source = source
        self._tokenizer = tokenizer
        self._repeat = repeat
        self.restore({"epoch": 0, "source": None, "carry": [], "skipped_records": 0})

    @property
    def skipped_records(self) -> int:
        """Bad records and unreadable file parts before the last document handed out."""
        return self._skipped

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "source": self._position,
            "carry": list(self._carry),
            "skipped_records": self._skipped,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state`; only moves the source (files are read by `take`).

        A state without `skipped_records` (saved before it existed) counts from 0.
        """
        self._epoch = state["epoch"]
        self._position = state["source"]
        self._carry = [int(token) for token in state["carry"]]
        self._skipped = int(state.get("skipped_records", 0))
        self._source.seek(self._position)
        self._source.skipped = self._skipped
        self._documents = self._tokenized_documents(self._epoch)

    def take(self, n: int) -> list[int]:
        """The next `n` tokens; fewer only where a non-repeating stream ends."""
        tokens, self._carry = self._carry[:n], self._carry[n:]
        while len(tokens) < n:
            document = next(self._documents, None)
            if document is None:
                break
            ids, self._epoch, self._position, self._skipped = document
            needed = n - len(tokens)
            tokens += ids[:needed]
            self._carry = ids[needed:]
        return tokens

    def _tokenized_documents(self, epoch: int) -> Iterator[_Document]:
        """Every document, tokenized, with where it leaves the source; into new epochs."""
        while True:
            texts: list[str] = []
            marks: list[tuple[Position, int]] = []
            for text in self._source:
                texts.append(text)
                marks.append((self._source.position(), self._source.skipped))
                if len(texts) == _ENCODE_BATCH:
                    yield from self._encode(texts, marks, epoch)
                    texts, marks = [], []
            yield from self._encode(texts, marks, epoch)
            if not self._repeat:
                return
            epoch += 1
            self._source.seek(None)

    def _encode(
        self, texts: list[str], marks: list[tuple[Position, int]], epoch: int
    ) -> Iterator[_Document]:
        if not texts:
            return
        for ids, (position, skipped) in zip(self._tokenizer.encode_batch(texts), marks,
                                            strict=True):
            ids.append(self._tokenizer.eos_id)
            yield ids, epoch, position, skipped
