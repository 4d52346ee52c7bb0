"""Export approved dialogues as ShareGPT JSONL plus a `dataset_info.json`, the shapes
LLaMA-Factory reads as they are (and `rolecast train` reads too); both formats are
`formats.sharegpt`'s.

Each line is `{"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}]}`: the card's
system prompt, then alternating human/gpt turns ending on the approved reply. Several people
speaking in a row become one human turn with `Name: text` lines (the same way the prompt shows
them), leading replies before the first human turn (a greeting) are dropped, and Discord's
raw mentions and ids are replaced by display names.

A scene's dialogue trains the persona on its own replies only: the other personas' replies are
part of the human turns, under their names as the prompt showed them (`Name:` and a new line),
and the system prompt carries the scene's note after the card, as the prompt did.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bot.core.cards import Card
from bot.core.memory import Dialogue
from bot.core.prompt import named_turn, render_system, scene_note
from bot.core.text import clean_text, defuse_control_tokens
from formats import sharegpt
from formats.sharegpt import ASSISTANT, SYSTEM, USER

# `<@123>`, `<@!123>` users; `<@&123>` roles; `<#123>` channels; `<:name:123>` emoji;
# `<t:1700000000:R>` timestamps; bare snowflakes (17-20 digits).
_MENTION = re.compile(r"<(@!?|@&|#)(\d{15,21})>")
_EMOJI = re.compile(r"<a?:(\w+):\d{15,21}>")
_TIMESTAMP = re.compile(r"<t:(\d+)(?::[tTdDfFR])?>")
_SNOWFLAKE = re.compile(r"(?<![\w/])\d{17,20}(?![\w/])")


@dataclass(frozen=True)
class Names:
    """Display names by Discord id, for the export (the cog fills them from the guild)."""

    users: dict[str, str]
    roles: dict[str, str]
    channels: dict[str, str]


Resolver = Callable[[str, str], str | None]  # (kind, id) -> name


def scrub(text: str, names: Names) -> str:
    """Replace Discord mentions and ids by names; unknown ones become neutral words."""

    def mention(match: re.Match[str]) -> str:
        kind, ident = match.group(1), match.group(2)
        if kind == "#":
            return "#" + names.channels.get(ident, "channel")
        if kind == "@&":
            return "@" + names.roles.get(ident, "role")
        return "@" + names.users.get(ident, "someone")

    def snowflake(match: re.Match[str]) -> str:
        ident = match.group(0)
        for table in (names.users, names.roles, names.channels):
            if ident in table:
                return table[ident]
        return "[id]"

    text = _MENTION.sub(mention, text)
    text = _EMOJI.sub(lambda m: f":{m.group(1)}:", text)
    text = _TIMESTAMP.sub("[time]", text)
    text = text.replace("@everyone", "everyone").replace("@here", "here")
    return _SNOWFLAKE.sub(snowflake, text)


def to_sharegpt(
    dialogue: Dialogue, card: Card, names: Names, *, speaker_names: bool = True
) -> dict[str, object] | None:
    """One dialogue as a ShareGPT record, or None when nothing trainable is left."""
    turns: list[tuple[str, str]] = []  # (role, content), consecutive same-role merged
    for message in dialogue.messages:
        # Training renders the same chat template: look-alikes of its control tokens in what
        # members wrote must stay text there too (the system prompt is defused already).
        content = defuse_control_tokens(scrub(str(message.get("content") or ""), names)).strip()
        if not content:
            continue
        if message.get("persona"):
            # another persona of a scene, named as its prompt named it
            speaker = str(message.get("author_name") or message["persona"])
            content = named_turn(defuse_control_tokens(speaker), content)
            role = USER
        elif message.get("role") == "user":
            author = message.get("author_name")
            if speaker_names and author:
                content = f"{defuse_control_tokens(scrub(str(author), names))}: {content}"
            role = USER
        else:
            role = ASSISTANT
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n{content}")
        else:
            turns.append((role, content))
    while turns and turns[0][0] != USER:
        turns.pop(0)
    if len(turns) < 2 or turns[-1][0] != ASSISTANT:
        return None
    first_human = next(
        (
            str(m["author_name"])
            for m in dialogue.messages
            if m.get("role") == "user" and m.get("author_name") and not m.get("persona")
        ),
        "User",
    )
    system = render_system(card, user=scrub(first_human, names))
    if any(m.get("persona") for m in dialogue.messages):
        system = f"{system}\n\n{scene_note(card.data.name)}"
    messages = [{"role": SYSTEM, "content": system}]
    messages += [{"role": role, "content": content} for role, content in turns]
    return sharegpt.sharegpt_row(f"{dialogue.persona}_{dialogue.id}", messages)


def dataset_name(persona: str) -> str:
    return f"rolecast_{persona}"


@dataclass(frozen=True)
class Export:
    persona: str
    jsonl: bytes
    dataset_info: bytes
    records: int
    skipped: int

    @property
    def file_name(self) -> str:
        return f"{self.persona}.jsonl"


def export_dialogues(
    persona: str, card: Card, dialogues: Iterable[Dialogue], names: Names
) -> Export:
    lines, skipped = [], 0
    for dialogue in dialogues:
        record = to_sharegpt(dialogue, card, names)
        if record is None:
            skipped += 1
            continue
        lines.append(clean_text(sharegpt.jsonl_line(record)))
    info = sharegpt.dataset_info_bytes({dataset_name(persona): f"{persona}.jsonl"})
    return Export(persona, "".join(lines).encode(), info, len(lines), skipped)
