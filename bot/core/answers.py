"""The model server's answers, read defensively.

Nothing a model server sends is trusted: a body may be HTML, JSON of the wrong shape or size,
an event stream of garbage or binary, or a stream that stops half-way. The readers here turn an
answer into typed values or raise `MalformedAnswer` saying what was wrong; whatever the bytes,
they raise nothing else.

Streams are read as Server-Sent Events the way the WHATWG spec defines them (any line ending,
comments, multi-line data), each event's data as one chat-completion chunk. A stream is only
complete when it ends with `data: [DONE]`: a stream that stops without it was cut, however
cleanly the connection closed. (The openai SDK lets a non-JSON event escape as a
`JSONDecodeError`, yields JSON of any shape, and ends a stream without `[DONE]` as if it were
complete; that is why the bot reads the stream itself.)
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.core.text import clean_text, for_terminal

log = logging.getLogger(__name__)

MAX_EVENT_CHARS = 1024 * 1024  # one SSE event (a chunk is a few hundred bytes)
MAX_BODY_BYTES = 16 * 1024 * 1024  # a JSON answer (/tokenize lists every token id)

Count = Annotated[int, Field(strict=True, ge=0, lt=2**31)]


class MalformedAnswer(Exception):
    """An answer the bot cannot read; the message says what was wrong with it."""


class StreamErrorEvent(MalformedAnswer):
    """The server reported an error inside the stream (`data: {"error": {...}}`)."""


def snippet(text: str | bytes, limit: int = 80) -> str:
    """A short printable excerpt of something a server sent, for messages and logs."""
    if isinstance(text, bytes):
        text = text[: limit * 4].decode("utf-8", "replace")
    text = " ".join(for_terminal(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_message(body: object) -> str | None:
    """The message of a vLLM-shaped error body (`{"error": {"message": ...}}` or flat)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return snippet(inner["message"], 300)
        if isinstance(inner, str):
            return snippet(inner, 300)
    return None


def parse_json(body: bytes, what: str) -> Any:
    """A JSON body, or MalformedAnswer."""
    if len(body) > MAX_BODY_BYTES:
        raise MalformedAnswer(f"{what} answer is larger than {MAX_BODY_BYTES // 1024 // 1024} MiB")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, absurd numbers or nesting
        raise MalformedAnswer(f"{what} answer is not JSON: {snippet(body)!r}") from None


def _first_error(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(part) for part in item["loc"]) or "(body)"
    return f"{where}: {item['msg']}"


# -- /tokenize and /v1/models ---------------------------------------------------------------


class _TokenCount(BaseModel):
    count: Count
    max_model_len: Annotated[int, Field(strict=True, ge=1, lt=2**31)]


def read_token_count(body: bytes) -> tuple[int, int]:
    """(count, max_model_len) from a `/tokenize` answer."""
    data = parse_json(body, "the /tokenize")
    if not isinstance(data, dict):
        raise MalformedAnswer(f"the /tokenize answer is not an object: {snippet(body)!r}")
    try:
        parsed = _TokenCount.model_validate(data)
    except ValidationError as exc:
        raise MalformedAnswer(f"the /tokenize answer has {_first_error(exc)}") from None
    return parsed.count, parsed.max_model_len


class _ModelEntry(BaseModel):
    id: Annotated[str, Field(strict=True, min_length=1, max_length=256)]
    root: str | None = None
    parent: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    id: str
    root: str | None
    parent: str | None


def read_models(body: bytes) -> list[ModelEntry]:
    """The served models of a `/v1/models` answer; entries of the wrong shape are skipped."""
    data = parse_json(body, "the /v1/models")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise MalformedAnswer(f"the /v1/models answer has no 'data' list: {snippet(body)!r}")
    entries, skipped = [], 0
    for item in data["data"]:
        try:
            entry = _ModelEntry.model_validate(item)
        except ValidationError:
            skipped += 1
            continue
        entries.append(ModelEntry(clean_text(entry.id), entry.root, entry.parent))
    if skipped:
        log.warning("the model list had %d entries of the wrong shape; skipped", skipped)
    return entries


# -- server-sent events ----------------------------------------------------------------------

_NEWLINE = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Bytes in, the data of complete events out (`feed`, then `close` at the end)."""

    def __init__(self, max_event_chars: int = MAX_EVENT_CHARS) -> None:
        self.max_event_chars = max_event_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""  # the start of a line whose end has not arrived
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[str]:
        return self._lines(self._decoder.decode(chunk), final=False)

    def close(self) -> list[str]:
        """The events left when the stream ends; a last event without its blank line counts."""
        events = self._lines(self._decoder.decode(b"", final=True), final=True)
        if self._data:
            events.append(self._dispatch())
        return events

    def _lines(self, text: str, *, final: bool) -> list[str]:
        text = self._line + text
        hold = ""
        if not final and text.endswith("\r"):
            text, hold = text[:-1], "\r"  # the "\n" of a "\r\n" may be in the next chunk
        lines = _NEWLINE.split(text)
        rest = lines.pop()
        if final:
            if rest:
                lines.append(rest)
            rest = ""
        self._line = rest + hold
        if len(self._line) > self.max_event_chars:
            raise MalformedAnswer(f"a stream line longer than {self.max_event_chars:,} characters")
        events = []
        for line in lines:
            event = self._take(line)
            if event is not None:
                events.append(event)
        return events

    def _take(self, line: str) -> str | None:
        if not line:
            return self._dispatch() if self._data else None
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size > self.max_event_chars:
                raise MalformedAnswer(
                    f"a stream event longer than {self.max_event_chars:,} characters"
                )
            self._data.append(value)
        return None  # event, id, retry and unknown fields change nothing here

    def _dispatch(self) -> str:
        data = "\n".join(self._data)
        self._data.clear()
        self._size = 0
        return data


# -- chat-completion chunks ------------------------------------------------------------------


class _Delta(BaseModel):
    # Only `content` is the reply: a reasoning model's `reasoning` (`reasoning_content` in
    # older vLLM) and every other field are ignored, so analysis text never reaches a user.
    model_config = ConfigDict(extra="ignore")

    content: str | None = None


class _StreamChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    delta: _Delta | None = None
    finish_reason: Annotated[str, Field(max_length=64)] | None = None


class _ChatChunk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    choices: list[_StreamChoice] = Field(default_factory=list, max_length=16)


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None


@dataclass
class ChatStream:
    """What a chat stream has said so far."""

    done: bool = False  # `data: [DONE]` arrived
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def read(self, event: str) -> list[str]:
        """The text deltas of one event; MalformedAnswer when it is not a chat chunk."""
        if self.done:
            return []  # nothing after [DONE] counts
        if event.strip() == "[DONE]":
            self.done = True
            return []
        try:
            data = json.loads(event)
        except (ValueError, RecursionError):
            raise MalformedAnswer(f"a stream event that is not JSON: {snippet(event)!r}") from None
        if not isinstance(data, dict):
            raise MalformedAnswer(f"a stream event that is not an object: {snippet(event)!r}")
        if data.get("error"):
            message = error_message(data) or snippet(json.dumps(data["error"], default=str))
            raise StreamErrorEvent(f"the server reported an error: {message}")
        try:
            chunk = _ChatChunk.model_validate(data)
        except ValidationError as exc:
            raise MalformedAnswer(f"a chunk with {_first_error(exc)}") from None
        if data.get("usage") is not None:
            self._usage(data["usage"])
        texts = []
        for choice in chunk.choices:
            if choice.finish_reason:
                self.finish_reason = clean_text(choice.finish_reason)
            if choice.delta is not None and choice.delta.content:
                texts.append(clean_text(choice.delta.content))
        return texts

    def _usage(self, raw: object) -> None:
        # Wrong usage figures cost the reply nothing: they are only left unknown.
        try:
            usage = _Usage.model_validate(raw)
        except ValidationError as exc:
            log.warning("ignoring a usage report of the wrong shape (%s)", _first_error(exc))
            return
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens

    @property
    def complete(self) -> bool:
        """The reply finished: the server said `stop` and ended the stream with `[DONE]`."""
        return self.done and self.finish_reason == "stop"
