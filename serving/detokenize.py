"""Incremental detokenization with stop strings: text leaves the server as soon as it can no
longer change and can no longer turn out to be the start of a stop string."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        # Hold back as many characters as a stop string could still need to complete.
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text = ""
        self._sent = 0
        self.stopped_by: str | None = None

    def update(self, token_ids: list[int]) -> str:
        """Feed all generated ids so far; returns the new text that is safe to send. Sets
        `stopped_by` when a stop string appeared (the string and what follows are not sent)."""
        text = self._tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character split across tokens: wait for the rest
        self._text = text
        if self._stops:
            start = max(0, self._sent - self._hold)
            hits = [(i, s) for s in self._stops if (i := text.find(s, start)) != -1]
            if hits:
                index, stop = min(hits)
                self.stopped_by = stop
                delta = text[self._sent : index]
                self._sent = index
                self._text = text[:index]
                return delta
        limit = len(text) - self._hold
        if limit <= self._sent:
            return ""
        delta = text[self._sent : limit]
        self._sent = limit
        return delta

    def flush(self) -> str:
        """The rest of the text, once generation has ended for another reason."""
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta
