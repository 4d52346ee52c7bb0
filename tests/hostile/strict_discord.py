"""Discord's servers as strict as the real ones about documented limits.

`StrictDiscordAPI` is the test suite's `FakeDiscordAPI` that, like Discord, refuses with a 400
(Invalid Form Body) any webhook post, edit, interaction answer or plain message that breaks a
limit, or that replies to a message that no longer exists without `fail_if_not_exists: false`,
and records what it refused. The limits are written here from Discord's documentation,
independently of the bot's own `bot.discord.limits`, so the two check each other.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import discord
import pytest
from discord.ext.test import backend

from tests.discord.fakediscord import FakeDiscordAPI

CONTENT = 2000
USERNAME = (1, 80)
EMBED = {"title": 256, "description": 4096, "fields": 25, "field_name": 256, "field_value": 1024}
EMBED_FOOTER, EMBED_AUTHOR, EMBED_TOTAL = 2048, 256, 6000
CHOICES, CHOICE_NAME, CHOICE_VALUE = 25, 100, 100


def content_problems(content: object) -> list[str]:
    if content is None:
        return []
    text = str(content)
    problems = [f"content of {len(text)} characters"] if len(text) > CONTENT else []
    if any("\ud800" <= c <= "\udfff" for c in text):
        problems.append("content holds a lone surrogate")
    return problems


def username_problems(name: object) -> list[str]:
    if name is None:
        return []
    text = str(name)
    problems = []
    if not USERNAME[0] <= len(text.strip()) <= USERNAME[1] or len(text) > USERNAME[1]:
        problems.append(f"username of {len(text)} characters")
    lowered = text.lower()
    for word in ("clyde", "discord", "@", "#", ":", "```"):
        if word in lowered:
            problems.append(f"username contains {word!r}")
    if lowered.strip() in ("everyone", "here"):
        problems.append("username is a reserved word")
    return problems


def embed_problems(embed: dict[str, Any]) -> list[str]:
    problems = []
    total = 0
    for key in ("title", "description"):
        value = str(embed.get(key) or "")
        total += len(value)
        if len(value) > EMBED[key]:
            problems.append(f"embed {key} of {len(value)} characters")
    fields = embed.get("fields") or []
    if len(fields) > EMBED["fields"]:
        problems.append(f"{len(fields)} embed fields")
    for field in fields:
        name, value = str(field.get("name", "")), str(field.get("value", ""))
        total += len(name) + len(value)
        if not name.strip() or len(name) > EMBED["field_name"]:
            problems.append(f"embed field name of {len(name)} characters")
        if not value.strip() or len(value) > EMBED["field_value"]:
            problems.append(f"embed field value of {len(value)} characters")
    footer = str((embed.get("footer") or {}).get("text") or "")
    author = str((embed.get("author") or {}).get("name") or "")
    total += len(footer) + len(author)
    if len(footer) > EMBED_FOOTER:
        problems.append(f"embed footer of {len(footer)} characters")
    if len(author) > EMBED_AUTHOR:
        problems.append(f"embed author of {len(author)} characters")
    if total > EMBED_TOTAL:
        problems.append(f"embed of {total} characters in all")
    return problems


def choice_problems(choices: list[dict[str, Any]]) -> list[str]:
    problems = [f"{len(choices)} choices"] if len(choices) > CHOICES else []
    for item in choices:
        name, value = str(item.get("name", "")), str(item.get("value", ""))
        if not 1 <= len(name) <= CHOICE_NAME:
            problems.append(f"choice name of {len(name)} characters")
        if not 1 <= len(value) <= CHOICE_VALUE:
            problems.append(f"choice value of {len(value)} characters")
    return problems


def payload_problems(payload: dict[str, Any]) -> list[str]:
    problems = content_problems(payload.get("content"))
    problems += username_problems(payload.get("username"))
    avatar = payload.get("avatar_url")
    if avatar is not None and (len(str(avatar)) > 2048 or not str(avatar).startswith("http")):
        problems.append("avatar_url is not a usable URL")
    for embed in payload.get("embeds") or []:
        problems += embed_problems(embed)
    data = payload.get("data")
    if isinstance(data, dict):  # an interaction callback
        problems += payload_problems(data)
        if "choices" in data:
            problems += choice_problems(data["choices"])
    return problems


def refuse(problems: list[str]) -> discord.HTTPException:
    return discord.HTTPException(
        backend.FakeRequest(400, "Bad Request"),
        {"code": 50035, "message": f"Invalid Form Body: {'; '.join(problems)}"},
    )


class StrictDiscordAPI(FakeDiscordAPI):
    """FakeDiscordAPI that refuses what Discord refuses; `refused` lists what it refused."""

    def __init__(self, client: discord.Client) -> None:
        super().__init__(client)
        self.refused: list[str] = []
        self.replied_to: list[int] = []  # the messages plain messages were sent as replies to

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().install(monkeypatch)
        http = self.client.http
        send, edit = http.send_message, http.edit_message
        api = self

        # dpytest finds the channel (or message) a call is about in its caller's locals
        # (`channel`, `self`): the wrappers hold their own caller's, as if they were not there.
        async def send_message(channel_id: int, *, params: Any) -> Any:
            channel = sys._getframe(1).f_locals.get("channel")  # noqa: F841
            api._check(params.payload or {})
            api._check_reference(channel_id, params.payload or {})
            return await send(channel_id, params=params)

        async def edit_message(channel_id: int, message_id: int, **fields: Any) -> Any:
            self = sys._getframe(1).f_locals.get("self")  # noqa: F841
            params = fields.get("params")
            api._check(getattr(params, "payload", None) or {})
            return await edit(channel_id, message_id, **fields)

        monkeypatch.setattr(http, "send_message", send_message)
        monkeypatch.setattr(http, "edit_message", edit_message)

    def _check_reference(self, channel_id: int, payload: dict[str, Any]) -> None:
        """A reply to a deleted message fails unless it asked to be sent as a plain message
        then (Discord's `fail_if_not_exists`, true by default); else it is a reply."""
        reference = payload.get("message_reference")
        if not reference:
            return
        message_id = int(reference["message_id"])
        config = backend._cur_config
        assert config is not None
        there = config.messages.get(int(reference.get("channel_id", channel_id)), [])
        if any(int(m["id"]) == message_id for m in there):
            self.replied_to.append(message_id)
        elif reference.get("fail_if_not_exists", True):
            self.refused.append("message_reference: Unknown message")
            raise refuse(["message_reference: Unknown message"])

    def _check(self, payload: dict[str, Any]) -> None:
        problems = payload_problems(payload)
        if problems:
            self.refused.extend(problems)
            raise refuse(problems)

    async def request(  # type: ignore[override]
        self,
        route: Any,
        session: Any,
        *,
        payload: dict[str, Any] | None = None,
        multipart: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        seen = dict(payload or {})
        for part in multipart or []:
            if part.get("name") == "payload_json":
                seen = json.loads(part["value"])
        self._check(seen)
        return await super().request(route, session, payload=payload, multipart=multipart, **kwargs)
