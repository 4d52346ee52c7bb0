"""Labels and replies in the harmony chat format of gpt-oss.

Harmony renders a turn differently depending on what follows it: the last assistant turn of a
training render closes with `<|return|>` (the token that ends generation), the same turn closes
with `<|end|>` once later turns follow (history is never shown `<|return|>`). So the span of
turn *i* cannot be read off one render as `finetune.template` does for prefix-stable templates;
here it is read off the template's own renders, turn by turn, and checked against the harmony
structure:

- `render(messages[:i], generation prompt)` ends where the model starts to speak
  (`...<|start|>assistant`);
- `render(messages[:i+1])` is that plus the turn as generation must produce it:
  `<|channel|>final<|message|>` + the reply + `<|return|>`;
- the full conversation holds the same turn with its closing token rewritten to `<|end|>` when
  later turns follow.

Every assistant turn's label is what generation must produce at that point: the channel header,
the reply and `<|return|>`. For an earlier turn the input there is `<|end|>`, as the model will
see it in history, while the label is `<|return|>`, the token it must emit when it answers; the
loss of turn *i* is then exactly the loss of rendering the conversation up to turn *i* alone
(causal attention sees only the prefix), at the cost of one render.

Message text is always plain text, by the rule the server applies (`formats.rendering`): the
special-token strings in a message are tokenized as characters, never as control tokens; only
the template's own markup is, and a dialogue is encoded into the ids the server reads for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finetune.data import ASSISTANT, Message
from finetune.errors import TemplateError
from formats.rendering import ChatRenderer

IGNORE_INDEX = -100
START, END, RETURN, CALL = "<|start|>", "<|end|>", "<|return|>", "<|call|>"
CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
MARKUP = (START, END, RETURN, CALL, CHANNEL, MESSAGE)


def is_harmony(tokenizer: Any) -> bool:
    """Whether the tokenizer speaks harmony: its template writes `<|channel|>` and it has the
    harmony control tokens as special tokens."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or CHANNEL not in template:
        return False
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    specials |= {
        str(t.content)
        for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)
    }
    return all(token in specials for token in MARKUP)


@dataclass(frozen=True)
class Turn:
    """An assistant turn in the full render: [start, body_end) is trained, then its closer."""

    start: int
    body_end: int


def turns(
    render: Callable[[int, bool], str], full: str, messages: Sequence[dict[str, str]]
) -> list[Turn]:
    """The trained span of every assistant turn in `full` (`render(n, generation)` renders the
    first n messages), checked against the harmony rules."""
    found = []
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = render(i, True)
        through = render(i + 1, False)
        if not (through.startswith(before) and full.startswith(before)):
            raise TemplateError(
                "the harmony template renders the conversation before an assistant turn "
                "differently once the turn follows"
            )
        turn = through[len(before) :]
        if not turn.endswith(RETURN):
            raise TemplateError(f"the harmony template does not close a last turn with {RETURN}")
        body = turn[: -len(RETURN)]
        rest = full[len(before) :]
        if not rest.startswith(body) or not rest[len(body) :].startswith((RETURN, END)):
            raise TemplateError(
                "the harmony template renders an assistant turn differently once later turns "
                f"follow (other than closing it with {END})"
            )
        if message["content"] not in body:
            raise TemplateError("the chat template does not render the assistant text verbatim")
        found.append(Turn(len(before), len(before) + len(body)))
    return found


def encode(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Token ids of the templated dialogue, as the server reads them (`formats.rendering`: the
    special-token strings of message text are plain text), and its labels (see the module
    docstring)."""
    renderer = ChatRenderer(tokenizer)
    hidden = renderer.hide([dict(m) for m in messages])

    def render(count: int, generation: bool) -> str:
        text: str = tokenizer.apply_chat_template(
            hidden.messages[:count], tokenize=False, add_generation_prompt=generation
        )
        return text

    full = render(len(messages), False)
    spans = turns(render, full, hidden.messages)
    if hidden.strings:
        found = renderer.ids_and_starts(full, hidden)
        if found is None:  # the template rewrote a placeholder: break the strings up instead
            return encode(tokenizer, renderer.defuse([dict(m) for m in messages]))
        ids, starts = found
    else:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = list(enc["input_ids"]), [begin for begin, _ in enc["offset_mapping"]]
    return_id = int(tokenizer.convert_tokens_to_ids(RETURN))
    labels = []
    for token, start in zip(ids, starts, strict=True):
        if any(t.body_end == start for t in spans):
            labels.append(return_id)  # what the model emits here, whatever history shows
        elif any(t.start <= start < t.body_end for t in spans):
            labels.append(token)
        else:
            labels.append(IGNORE_INDEX)
    return ids, labels


@dataclass(frozen=True)
class Parsed:
    """A generated assistant message, split by channel."""

    final: str
    analysis: str


def split_channels(tokenizer: Any, ids: Sequence[int]) -> Parsed:
    """The text of the final and analysis channels in ids generated after `<|start|>assistant`.

    Text outside any channel's message body (headers, recipients) is dropped; a body that is
    never closed counts up to the end (a reply cut at the token limit), less a character the
    cut split.
    """
    token = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in MARKUP}
    closers = {token[END], token[RETURN], token[CALL]}
    final: list[int] = []
    analysis: list[int] = []
    header: list[int] = []
    body: list[int] | None = None
    channel = ""
    for i in ids:
        if body is not None:
            if i in closers:
                (final if channel == "final" else analysis if channel == "analysis" else []).extend(
                    body
                )
                body, header, channel = None, [], ""
                continue
            body.append(i)
        elif i == token[MESSAGE]:
            channel = _channel_of(tokenizer, header, token[CHANNEL])
            body = []
        elif i == token[START]:
            header = []
        else:
            header.append(i)
    if body is not None:
        (final if channel == "final" else analysis if channel == "analysis" else []).extend(body)

    def decode(part: list[int]) -> str:
        # a body cut inside a multi-byte character ends in a replacement character: drop it
        text: str = tokenizer.decode(part, skip_special_tokens=True)
        return text.removesuffix("\ufffd")

    return Parsed(final=decode(final), analysis=decode(analysis))


def _channel_of(tokenizer: Any, header: list[int], channel_id: int) -> str:
    """The channel a message header names (`assistant<|channel|>final` -> `final`)."""
    if channel_id not in header:
        return ""
    after = header[header.index(channel_id) + 1 :]
    text: str = tokenizer.decode(after, skip_special_tokens=True)
    return text.strip().split(" ", 1)[0]
