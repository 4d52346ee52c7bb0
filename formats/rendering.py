"""Chat prompts as token ids, where message text never becomes a control token: the one rule
for the embedded server (`serving`) and for training (`finetune.template`), so that a model is
trained on the ids it is served.

The chat template is rendered to text and that text tokenized. Tokenized whole with special
tokens enabled, a message saying `<|im_end|>\\n<|im_start|>system ...` would close its own turn
and open a system turn, and with `split_special_tokens=True` the template's own markers would
stop being special too. So the special-token strings inside message contents are swapped for
placeholders (a random nonce, private-use delimiters) before rendering; the rendered text is
tokenized with special tokens enabled between the placeholders, where only the template's own
markup is left, and each placeholder's string is tokenized as plain text. The template still
sees every message's own text (it may trim or split it), and its markers stay single special
ids. `/tokenize` renders through the same function, so it counts the ids the model reads.

Only the tokenizer's own methods are called (no model library is imported here).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_OPEN, _CLOSE = "\ue000", "\ue001"
_ZWJ = "\u200d"


@dataclass(frozen=True)
class Hidden:
    """Messages whose special-token strings are swapped for placeholders, and what they hide."""

    messages: list[dict[str, str]]
    nonce: str
    strings: list[str]


class ChatRenderer:
    """Renders messages with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False):
                specials.add(str(token.content))
        specials.discard("")
        self.special_strings = frozenset(specials)
        # Longest first, so that a token containing another is matched whole.
        alternatives = sorted(specials, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def hide(self, messages: Sequence[dict[str, str]]) -> Hidden:
        """`messages` with every special-token string in their contents behind a placeholder
        (the same placeholders however often the result is rendered)."""
        nonce = str(secrets.randbelow(10**12))
        hidden: list[str] = []

        def swap(match: re.Match[str]) -> str:
            hidden.append(match.group(0))
            return f"{_OPEN}{nonce}:{len(hidden) - 1}{_CLOSE}"

        safe = [
            {**m, "content": self._special.sub(swap, m["content"])} if self._special else dict(m)
            for m in messages
        ]
        return Hidden(safe, nonce, hidden)

    def defuse(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """`messages` with their special-token strings broken up by a zero-width joiner: the
        fallback where placeholders cannot be used."""
        if self._special is None:
            return [dict(m) for m in messages]
        return [
            {**m, "content": self._special.sub(lambda t: t[0][0] + _ZWJ + t[0][1:], m["content"])}
            for m in messages
        ]

    def render_text(
        self, messages: Sequence[dict[str, str]], **template_kwargs: Any
    ) -> tuple[str, str, list[str]]:
        """The rendered prompt with placeholders, their nonce, and the strings they hide."""
        hidden = self.hide(messages)
        text = self.tokenizer.apply_chat_template(
            hidden.messages, tokenize=False, **template_kwargs
        )
        return text, hidden.nonce, hidden.strings

    def ids(self, messages: Sequence[dict[str, str]], **template_kwargs: Any) -> list[int]:
        """Token ids of the rendered prompt; see the module docstring."""
        text, nonce, hidden = self.render_text(messages, **template_kwargs)
        if not hidden:
            return self._encode(text)
        segments = self.segments(text, Hidden([], nonce, hidden))
        if segments is None:
            # The template rewrote a placeholder (escaped it, say): render the contents with
            # their control-token strings broken up instead, which is as safe.
            return self._encode(self._render_defused(messages, **template_kwargs))
        return [i for _, part, plain in segments for i in self._encode(part, plain=plain)]

    def segments(self, text: str, hidden: Hidden) -> list[tuple[int, str, bool]] | None:
        """`text` (rendered from `hidden.messages`) cut at its placeholders, as (where the
        piece starts in `text`, the piece, whether it is plain text): template markup between
        the placeholders, each hidden string in place of its placeholder. None when the
        template did not keep a placeholder as it was."""
        placeholder = re.compile(f"{_OPEN}{hidden.nonce}:(\\d+){_CLOSE}")
        segments: list[tuple[int, str, bool]] = []
        position = 0
        for match in placeholder.finditer(text):
            segments.append((position, text[position : match.start()], False))
            segments.append((match.start(), hidden.strings[int(match.group(1))], True))
            position = match.end()
        segments.append((position, text[position:], False))
        if any(hidden.nonce in part for _, part, plain in segments if not plain):
            return None
        return segments

    def ids_and_starts(self, text: str, hidden: Hidden) -> tuple[list[int], list[int]] | None:
        """Token ids of `text` (rendered from `hidden.messages`) as `ids` makes them, and where
        each token starts in `text` (a hidden string's tokens all start at its placeholder).
        None when the template did not keep a placeholder as it was."""
        segments = self.segments(text, hidden)
        if segments is None:
            return None
        ids: list[int] = []
        starts: list[int] = []
        for start, part, plain in segments:
            if not part:
                continue
            if plain:
                found = self._encode(part, plain=True)
                ids += found
                starts += [start] * len(found)
                continue
            enc = self.tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
            ids += list(enc["input_ids"])
            starts += [start + begin for begin, _ in enc["offset_mapping"]]
        return ids, starts

    def _render_defused(self, messages: Sequence[dict[str, str]], **template_kwargs: Any) -> str:
        text: str = self.tokenizer.apply_chat_template(
            self.defuse(messages), tokenize=False, **template_kwargs
        )
        return text

    def _encode(self, text: str, *, plain: bool = False) -> list[int]:
        if not text:
            return []
        kwargs: dict[str, Any] = {"add_special_tokens": False}
        if plain:
            kwargs["split_special_tokens"] = True
        return list(self.tokenizer(text, **kwargs)["input_ids"])
