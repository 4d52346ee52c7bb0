"""The records `Memory` reads and writes, frozen dataclasses built from its rows: a turn, a
channel and its settings, a rolling summary, an approved dialogue, and what forget-me
and members' deleted or edited messages took (`Forgotten`, `Erased`, `Rewritten`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from bot.core.text import clean_text

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]
TurnPolicy = Literal["round-robin", "keywords"]
# One persona's key, or a scene's cast (its keys, in order).
Cast = str | tuple[str, ...]


def _dialogue_messages(raw: object, dialogue_id: object) -> list[dict[str, str | None]]:
    """An approved dialogue's stored messages, each a map of text fields; [] when the row
    cannot be read (the export leaves it out, forget-me searches its raw text)."""
    try:
        value = json.loads(str(raw))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        log.warning("approved dialogue %s has unreadable messages; it is left out", dialogue_id)
        return []
    return [
        {str(k): None if v is None else clean_text(str(v)) for k, v in m.items()} for m in value
    ]


@dataclass(frozen=True)
class Turn:
    id: int
    channel_id: str
    persona: str
    role: Role
    author_id: str | None
    author_name: str | None
    content: str
    token_count: int | None
    model: str | None
    message_id: str | None
    created_at: float
    finish_reason: str | None = None  # how an assistant turn ended, as the server said
    complete: bool = True  # False: cut at the token limit, or the stream broke
    prompted_by: int | None = None  # a scene's reply: the member's turn it was written for

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Turn:
        values = list(row)
        values[12] = bool(values[12])  # `complete` is stored as 0/1
        return cls(*values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Channel:
    id: str
    persona: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ChannelSettings:
    """How a channel's persona is triggered and samples (admins set these), and its cast."""

    guild_id: str | None
    mode: Literal["mention", "always"]
    sampling: dict[str, object] | None
    persona: str | None = None  # the active persona's key (read with the settings)
    # A scene: its cast in order (the first is `persona`); one persona's channel: (persona,).
    cast: tuple[str, ...] = ()
    policy: TurnPolicy = "round-robin"
    chain_limit: int = 2
    next_persona: str | None = None  # handed the next turn
    # sampling overrides of cast members, by key
    cast_sampling: dict[str, dict[str, object]] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """The rolling summary of a persona's turns with id <= `through_id` in one channel."""

    content: str
    through_id: int
    token_count: int | None
    updated_at: float


@dataclass(frozen=True)
class Dialogue:
    """An approved reply with the turns before it, frozen as training data."""

    id: int
    turn_id: int
    channel_id: str
    guild_id: str | None
    persona: str
    messages: list[dict[str, str | None]]
    approved_by: str | None
    source: Literal["command", "reactions"]
    created_at: float

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Dialogue:
        values = list(row)
        values[5] = _dialogue_messages(values[5], values[0])
        return cls(*values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Forgotten:
    """What forget-me deleted from the database (`bot.core.forget` adds the files)."""

    turns: int  # the member's messages
    dialogues: int  # approved dialogues they wrote in, approved, or that quote them
    ratings: int
    replies: int = 0  # persona replies that answered or quoted them
    mentions: int = 0  # other turns and dialogues whose mentions of their id were redacted
    jobs: int = 0  # retrain jobs they requested (the request is kept, their id is not)
    texts: tuple[str, ...] = ()  # what they wrote, to find in files
    row_ids: frozenset[str] = frozenset()  # the deleted dialogues' ids in training files


@dataclass(frozen=True)
class Erased:
    """What deleting members' messages took from the database (`Memory.erase_messages`)."""

    turns: tuple[Turn, ...] = ()  # the members' messages
    replies: tuple[Turn, ...] = ()  # persona replies written from them
    dialogues: int = 0  # approved dialogues that held one of those
    ratings: int = 0  # ratings of those replies
    summaries: int = 0  # summaries that covered them, dropped to be rebuilt


@dataclass(frozen=True)
class Rewritten:
    """A member's edited message: its turn before and after (`Memory.rewrite_message`)."""

    before: Turn
    after: Turn
    dialogues: int = 0  # approved dialogues that held the old text, deleted
    summaries: int = 0  # summaries that covered it, dropped to be rebuilt

    @property
    def changed(self) -> bool:
        return self.before.content != self.after.content
