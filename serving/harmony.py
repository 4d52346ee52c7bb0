"""Replies of harmony models (gpt-oss), read by channel as they are generated.

A harmony model answers after `<|start|>assistant` with one or more messages, each
`<|channel|>NAME<|message|>TEXT` closed by `<|end|>` (more follows), `<|return|>` or `<|call|>`
(generation ends), a later message opened by `<|start|>assistant` again. The text of the
`final` channel is the reply; the `analysis` channel is the model's reasoning, which is never
part of the reply: the server sends it as `reasoning`, as vLLM does for gpt-oss with its
reasoning parser (`--reasoning-parser openai_gptoss`), and the bot reads only the reply.

A model that writes no channel at all (an untrained or a broken one) gets what vLLM's harmony
parser gives then: its raw text as the reply, once generation ends.
"""

from __future__ import annotations

from typing import Any

from serving.detokenize import IncrementalText

START, END, RETURN, CALL = "<|start|>", "<|end|>", "<|return|>", "<|call|>"
CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
MARKUP = (START, END, RETURN, CALL, CHANNEL, MESSAGE)


def is_harmony(model_type: str | None, tokenizer: Any) -> bool:
    """Whether replies come in harmony channels: a gpt-oss model whose tokenizer has the
    harmony control tokens (vLLM decides by the model type alone)."""
    if model_type != "gpt_oss":
        return False
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in MARKUP)


class HarmonyText:
    """`serving.detokenize.IncrementalText` for a harmony reply: `update` returns new text of
    the final channel (stop strings apply to it), `take_reasoning` the new analysis text."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in MARKUP}
        self._start, self._channel, self._message = ids[START], ids[CHANNEL], ids[MESSAGE]
        self._closers = {ids[END], ids[RETURN], ids[CALL]}
        self._final = IncrementalText(tokenizer, stops)
        self._analysis = IncrementalText(tokenizer, ())
        self._final_ids: list[int] = []
        self._analysis_ids: list[int] = []
        self._raw: list[int] = []
        self._header: list[int] = []
        self._body: str | None = None  # the channel of the message body being read
        self._opened = False
        self._seen = 0
        self._reasoning = ""

    @property
    def stopped_by(self) -> str | None:
        return self._final.stopped_by

    def update(self, token_ids: list[int]) -> str:
        """Feed all generated ids so far; returns the final channel's new text."""
        for token in token_ids[self._seen :]:
            self._read(token)
        self._seen = len(token_ids)
        self._reasoning += self._analysis.update(self._analysis_ids)
        return self._final.update(self._final_ids)

    def _read(self, token: int) -> None:
        self._raw.append(token)
        if self._body is not None:
            if token in self._closers:
                self._body, self._header = None, []
            elif self._body == "final":
                self._final_ids.append(token)
            elif self._body == "analysis":
                self._analysis_ids.append(token)
        elif token == self._message:
            self._body = self._channel_name()
            self._opened = True
        elif token == self._start:
            self._header = []
        else:
            self._header.append(token)

    def _channel_name(self) -> str:
        if self._channel not in self._header:
            return ""
        after = self._header[self._header.index(self._channel) + 1 :]
        text: str = self._tokenizer.decode(after, skip_special_tokens=True)
        return text.strip().split(" ", 1)[0]

    def take_reasoning(self) -> str:
        """The analysis text that arrived since the last call."""
        text, self._reasoning = self._reasoning, ""
        return text

    def flush(self) -> str:
        """The rest of the reply once generation ended (the raw text if no channel opened)."""
        self._reasoning += self._analysis.flush()
        if not self._opened and self._raw and self.stopped_by is None:
            raw: str = self._tokenizer.decode(self._raw, skip_special_tokens=True)
            return raw
        return self._final.flush()
