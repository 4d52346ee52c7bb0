"""Chat prompts as token ids, where message text never becomes a control token.

The chat template is rendered to text and that text tokenized. Tokenized whole with special
tokens enabled, a message saying `<|im_end|>\\n<|im_start|>system ...` would close its own turn
and open a system turn, and with `split_special_tokens=True` the template's own markers would
stop being special too. So the special-token strings inside message contents are swapped for
placeholders (a random nonce, private-use delimiters) before rendering; the rendered text is
tokenized with special tokens enabled between the placeholders, where only the template's own
markup is left, and each placeholder's string is tokenized as plain text. The template still
sees every message's own text (it may trim or split it), and its markers stay single special
ids. `/tokenize` renders through the same function, so it counts the ids the model reads.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

_OPEN, _CLOSE = "\ue000", "\ue001"
_ZWJ = "\u200d"


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

    def render_text(
        self, messages: Sequence[dict[str, str]], **template_kwargs: Any
    ) -> tuple[str, str, list[str]]:
        """The rendered prompt with placeholders, their nonce, and the strings they hide."""
        nonce = str(secrets.randbelow(10**12))
        hidden: list[str] = []

        def hide(match: re.Match[str]) -> str:
            hidden.append(match.group(0))
            return f"{_OPEN}{nonce}:{len(hidden) - 1}{_CLOSE}"

        safe = [
            {**m, "content": self._special.sub(hide, m["content"])} if self._special else dict(m)
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(safe, tokenize=False, **template_kwargs)
        return text, nonce, hidden

    def ids(self, messages: Sequence[dict[str, str]], **template_kwargs: Any) -> list[int]:
        """Token ids of the rendered prompt; see the module docstring."""
        text, nonce, hidden = self.render_text(messages, **template_kwargs)
        if not hidden:
            return self._encode(text)
        placeholder = re.compile(f"{_OPEN}{nonce}:(\\d+){_CLOSE}")
        segments: list[tuple[str, bool]] = []  # (text, plain)
        position = 0
        for match in placeholder.finditer(text):
            segments.append((text[position : match.start()], False))
            segments.append((hidden[int(match.group(1))], True))
            position = match.end()
        segments.append((text[position:], False))
        if any(nonce in part for part, plain in segments if not plain):
            # The template rewrote a placeholder (escaped it, say): render the contents with
            # their control-token strings broken up instead, which is as safe.
            return self._encode(self._render_defused(messages, **template_kwargs))
        return [i for part, plain in segments for i in self._encode(part, plain=plain)]

    def _render_defused(self, messages: Sequence[dict[str, str]], **template_kwargs: Any) -> str:
        assert self._special is not None
        safe = [
            {**m, "content": self._special.sub(lambda t: t[0][0] + _ZWJ + t[0][1:], m["content"])}
            for m in messages
        ]
        text: str = self.tokenizer.apply_chat_template(safe, tokenize=False, **template_kwargs)
        return text

    def _encode(self, text: str, *, plain: bool = False) -> list[int]:
        if not text:
            return []
        kwargs: dict[str, Any] = {"add_special_tokens": False}
        if plain:
            kwargs["split_special_tokens"] = True
        return list(self.tokenizer(text, **kwargs)["input_ids"])
