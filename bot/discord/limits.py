"""Discord's documented limits on what a bot sends, and the helpers that keep text inside them.

Discord refuses a whole request when one part breaks a limit, so a persona with a long name or
a card with a long description would otherwise silence a reply or a command. Every place that
sends text goes through these: message content (2,000 characters, also for ephemeral and
follow-up messages), webhook usernames (1-80 characters, never containing "clyde",
"discord", "@", "#", ":" or "```", never exactly "everyone" or "here"), embeds (title 256, description 4,096, 25
fields of name 256 / value 1,024, footer 2,048, author 256, 6,000 in all) and application
command choices (25 per answer, names and values of 1-100 characters).
"""

from __future__ import annotations

import re
from typing import Any, cast

import discord
from discord import app_commands

from bot.core.text import clean_text

MESSAGE_CHARS = 2000
WEBHOOK_NAME_CHARS = 80
EMBED_TITLE_CHARS = 256
EMBED_DESCRIPTION_CHARS = 4096
EMBED_FIELDS = 25
EMBED_FIELD_NAME_CHARS = 256
EMBED_FIELD_VALUE_CHARS = 1024
EMBED_FOOTER_CHARS = 2048
EMBED_AUTHOR_CHARS = 256
EMBED_TOTAL_CHARS = 6000
CHOICES = 25
CHOICE_CHARS = 100
AVATAR_URL_CHARS = 2048
ELLIPSIS = "…"
HAIR_SPACE = "\u200a"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# Substrings Discord refuses in webhook names; a hair space inside them keeps the name legible.
# Backticks get one between every two of them: splitting each "```" alone would leave a run of
# six as "`` ```" + "``" joined again.
_REFUSED_WORDS = re.compile(r"(c)(lyde)|(d)(iscord)|(`)(?=`)()", re.IGNORECASE)
_REFUSED_NAMES = re.compile(r"^(e)(veryone)$|^(h)(ere)$", re.IGNORECASE)
# Characters Discord refuses in usernames (they would read as mentions, channels or emoji):
# their full-width forms look the same and are accepted.
_REFUSED_CHARS = str.maketrans({"@": "\uff20", "#": "\uff03", ":": "\uff1a"})


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, with an ellipsis where it was cut."""
    text = clean_text(text)
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)].rstrip() + ELLIPSIS if limit > 0 else ""


def one_line(text: str, limit: int) -> str:
    """`text` on one line (whitespace collapsed), at most `limit` characters."""
    return shorten(" ".join(clean_text(text).split()), limit)


def _split_word(match: re.Match[str]) -> str:
    head, tail = next(
        (a, b) for a, b in zip(match.groups()[::2], match.groups()[1::2], strict=True) if a
    )
    return head + HAIR_SPACE + tail


def webhook_username(name: str, fallback: str = "Persona") -> str:
    """A webhook username Discord accepts, as close to `name` as it allows."""
    text = " ".join(_CONTROL.sub(" ", clean_text(name)).split()).translate(_REFUSED_CHARS)
    text = _REFUSED_WORDS.sub(_split_word, text)
    text = _REFUSED_NAMES.sub(_split_word, text)
    text = shorten(text, WEBHOOK_NAME_CHARS).strip()
    if not text:
        return fallback
    if len(text) == 1:
        text += "\u17b5"  # an invisible mark: Discord refuses one-character names
    return text


def plain_name(name: str) -> str:
    """A persona's name as the bold first line of a plain (non-webhook) message: one line of
    at most 80 characters, markdown escaped."""
    return discord.utils.escape_markdown(one_line(name, WEBHOOK_NAME_CHARS) or "Persona")


def message(text: str) -> str:
    """Message content within Discord's limit."""
    return shorten(text, MESSAGE_CHARS)


def avatar_url(url: object) -> str | None:
    """An http(s) avatar URL that Discord can take, else None."""
    if not isinstance(url, str) or len(url) > AVATAR_URL_CHARS:
        return None
    if not url.startswith(("http://", "https://")) or _CONTROL.search(url) or " " in url:
        return None
    return url


def choice(name: str, value: str) -> app_commands.Choice[str]:
    """An autocomplete choice with a name and value of 1-100 characters."""
    return app_commands.Choice(
        name=one_line(name, CHOICE_CHARS) or value[:CHOICE_CHARS], value=value[:CHOICE_CHARS]
    )


def fit_embed(embed: discord.Embed) -> discord.Embed:
    """`embed` cut to Discord's limits: each part, then the total (the description and the
    last fields give way first)."""
    data = cast(dict[str, Any], embed.to_dict())
    if "title" in data:
        data["title"] = one_line(str(data["title"]), EMBED_TITLE_CHARS) or "—"
    if "description" in data:
        data["description"] = shorten(str(data["description"]), EMBED_DESCRIPTION_CHARS) or "—"
    fields = data.get("fields", [])[:EMBED_FIELDS]
    for field in fields:
        field["name"] = one_line(str(field.get("name", "")), EMBED_FIELD_NAME_CHARS) or "—"
        field["value"] = (
            shorten(str(field.get("value", "")), EMBED_FIELD_VALUE_CHARS).strip() or "—"
        )
    if fields:
        data["fields"] = fields
    if "footer" in data and "text" in data["footer"]:
        data["footer"]["text"] = shorten(str(data["footer"]["text"]), EMBED_FOOTER_CHARS)
    if "author" in data and "name" in data["author"]:
        data["author"]["name"] = one_line(str(data["author"]["name"]), EMBED_AUTHOR_CHARS)

    def total() -> int:
        count = len(data.get("title", "")) + len(data.get("description", ""))
        count += sum(len(f["name"]) + len(f["value"]) for f in data.get("fields", []))
        count += len(data.get("footer", {}).get("text", ""))
        return count + len(data.get("author", {}).get("name", ""))

    excess = total() - EMBED_TOTAL_CHARS
    if excess > 0 and "footer" in data:
        text = data["footer"].get("text", "")
        data["footer"]["text"] = shorten(text, max(len(text) - excess, 0))
        excess = total() - EMBED_TOTAL_CHARS
    if "footer" in data and not data["footer"].get("text", "").strip():
        del data["footer"]  # Discord refuses an empty footer
    if excess > 0 and data.get("description"):
        keep = max(len(data["description"]) - excess, 1)
        data["description"] = shorten(data["description"], keep)
        excess = total() - EMBED_TOTAL_CHARS
    while excess > 0 and data.get("fields"):
        data["fields"].pop()
        excess = total() - EMBED_TOTAL_CHARS
    return discord.Embed.from_dict(data)
