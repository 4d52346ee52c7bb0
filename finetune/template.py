"""Token ids and assistant-only labels, with the spans taken from the tokenizer's chat template.

No role prefixes are written here. The span of assistant turn *i* is found by rendering the
template twice: the conversation up to turn *i* with the generation prompt (where the model
starts to speak) and the conversation through turn *i* (where the template closes that turn).
The text between the two — the reply and the template's own end-of-turn marker — is what the
model must learn to produce. Templates that mark turns with ``{% generation %}`` give the mask
directly and are used that way.

Message text is plain text, as the server reads it (`formats.rendering`, the rule both share): a
dataset whose rows say `<|im_end|>` or `<|im_start|>system` trains on those characters, never on
the control tokens, and a dialogue is encoded into the ids the server would read for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune import harmony
from finetune.data import ASSISTANT, Message
from finetune.errors import RefusedDialogue, TemplateError
from formats.rendering import ChatRenderer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One dialogue as token ids, with labels equal to the ids on assistant tokens, else -100
    (harmony templates label an earlier turn's closing token with the one generation emits:
    `finetune.harmony`)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template; use an instruct/chat model or set one on the tokenizer"
        )
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(
    tokenizer: Any, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant turn in it."""
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns follow, so "
                "assistant spans cannot be read from it; use a template with {% generation %} markers"
            )
        if message["content"] not in through[len(before) :]:
            raise TemplateError("the chat template does not render the assistant text verbatim")
        spans.append((len(before), len(through)))
    return full, spans


def encode(tokenizer: Any, messages: Sequence[Message]) -> Encoded:
    """Token ids of the templated dialogue and labels on the assistant turns only. Special-token
    strings inside the messages are encoded as plain text (see the module docstring)."""
    if harmony.is_harmony(tokenizer):  # turns close differently once others follow
        return Encoded(*harmony.encode(tokenizer, messages))
    renderer = ChatRenderer(tokenizer)
    hidden = renderer.hide([dict(m) for m in messages])
    template = getattr(tokenizer, "chat_template", None) or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        # transformers tokenizes the rendered text whole here: break the strings up instead
        safe = renderer.defuse([dict(m) for m in messages]) if hidden.strings else messages
        out = tokenizer.apply_chat_template(
            list(safe), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        return Encoded(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])

    if hidden.strings:
        text, spans = assistant_char_spans(tokenizer, hidden.messages)
        found = renderer.ids_and_starts(text, hidden)
        if found is None:  # the template rewrote a placeholder
            return _labelled(tokenizer, renderer.defuse([dict(m) for m in messages]))
        ids, starts = found
        return Encoded(ids, _labels(ids, starts, spans))
    return _labelled(tokenizer, messages)


def _labelled(tokenizer: Any, messages: Sequence[Message]) -> Encoded:
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return Encoded(ids, _labels(ids, [start for start, _ in enc["offset_mapping"]], spans))


def _labels(ids: list[int], starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Each id where its token starts inside an assistant span, else IGNORE_INDEX."""
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for j, start in enumerate(starts):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        if start >= spans[span_index][0]:
            labels[j] = ids[j]
    return labels


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token(s) with which the chat template closes an assistant turn.

    Read from the template: what it renders after a reply's text, up to the first token that
    is not special (ChatML: `<|im_end|>` before its newline; Llama 3: `<|eot_id|>`).
    """
    probe = "x"
    messages = [{"role": "user", "content": "?"}, {"role": ASSISTANT, "content": probe}]
    before = render(tokenizer, messages[:1], add_generation_prompt=True)
    through = render(tokenizer, messages)
    tail = through[len(before) :]
    if not tail.startswith(probe):
        return []
    tail_ids = tokenizer(tail[len(probe) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    ids = []
    for token in tail_ids:
        if token not in special:
            break
        ids.append(int(token))
    return ids


def count_tokens(tokenizer: Any, messages: Sequence[Message]) -> int:
    """Length of the templated dialogue in tokens (as the server counts it). TemplateError when
    the tokenizer has no usable template, RefusedDialogue when its template refuses `messages`."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template; use an instruct/chat model or set one on the tokenizer"
        )
    try:
        return len(ChatRenderer(tokenizer).ids([dict(m) for m in messages]))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template cannot be read: {exc}") from None
    except jinja2.TemplateError as exc:
        raise RefusedDialogue(f"the chat template refuses this dialogue: {exc}") from None


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt (for inference),
    as the server makes them."""
    return ChatRenderer(tokenizer).ids([dict(m) for m in messages], add_generation_prompt=True)
