"""Finding a member's words inside other text: the persona replies, approved dialogues and
training files that quote what a member wrote, which forget-me removes with their messages.

A quote is a run of at least `MIN_QUOTE` characters that a text shares with one of the
member's messages, compared case-folded, with whitespace collapsed and zero-width characters
dropped (the training export breaks control-token look-alikes up with a zero-width joiner). A
message shorter than that is found only whole. The messages are indexed by windows of `WINDOW`
characters at every `WINDOW`-th position, so any run of `MIN_QUOTE = 2 * WINDOW` characters
holds a whole indexed window; a window found in a text is then extended both ways to measure
the run, so common short phrases are not taken for quotes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WINDOW = 6
MIN_QUOTE = 2 * WINDOW
MIN_WHOLE = 4  # a short message (4-11 characters) counts when it appears whole

_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff]")


def normalize(text: str) -> str:
    return " ".join(_INVISIBLE.sub("", text).casefold().split())


class Quotes:
    """A member's messages; `found_in(text)` says whether `text` quotes one of them."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts: list[str] = []
        self.short: set[str] = set()
        self.index: dict[str, list[tuple[int, int]]] = {}  # window -> (text, start)
        for text in dict.fromkeys(normalize(t) for t in texts):
            if len(text) < MIN_QUOTE:
                if len(text) >= MIN_WHOLE:
                    self.short.add(text)
                continue
            number = len(self.texts)
            self.texts.append(text)
            for start in range(0, len(text) - WINDOW + 1, WINDOW):
                self.index.setdefault(text[start : start + WINDOW], []).append((number, start))

    def __bool__(self) -> bool:
        return bool(self.texts or self.short)

    def found_in(self, text: str) -> bool:
        text = normalize(text)
        if any(short in text for short in self.short):
            return True
        for i in range(len(text) - WINDOW + 1):
            for number, start in self.index.get(text[i : i + WINDOW], ()):
                if self._run(text, i, self.texts[number], start) >= MIN_QUOTE:
                    return True
        return False

    @staticmethod
    def _run(text: str, i: int, source: str, start: int) -> int:
        """The length of the common run through `text[i:]` and `source[start:]`, which agree
        on their first `WINDOW` characters."""
        before = 0
        while before < min(i, start) and text[i - before - 1] == source[start - before - 1]:
            before += 1
        after = WINDOW
        while (
            i + after < len(text)
            and start + after < len(source)
            and text[i + after] == source[start + after]
        ):
            after += 1
        return before + after
