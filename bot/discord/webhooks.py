"""Persona identity on Discord: replies posted through a channel webhook under the persona's
name and avatar, streamed by editing, split past Discord's 2,000 characters.

`WebhookCache` keeps one webhook per channel (found among the channel's webhooks or created),
forgets it when Discord says it is gone, and falls back to plain bot messages where the bot
lacks Manage Webhooks. `ReplyStream` turns a stream of text deltas into messages: it sends the
first part as soon as there is text, edits at most once per `interval_s`, and starts a new
message when the text outgrows the limit. Every message has `allowed_mentions` set to none, so
a reply can never ping @everyone, a role or a person.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import discord
import regex

from bot.discord.limits import MESSAGE_CHARS, avatar_url, plain_name, webhook_username

log = logging.getLogger(__name__)

MESSAGE_LIMIT = MESSAGE_CHARS
NO_MENTIONS = discord.AllowedMentions.none()

Messageable = discord.TextChannel | discord.Thread | discord.VoiceChannel


# Where a part may end, best first: a paragraph, a line, a sentence (CJK replies have no
# spaces), a word, a clause.
_BREAKS = ("\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", " ", "，", "、")
_FENCE = "```"
_FENCE_LANGUAGE = regex.compile(r"```([\w+#.-]{1,32})\n")
_GRAPHEME = regex.compile(r"\X")
_FENCE_ROOM = 200  # parts shorter than this are cut as they come


def _grapheme_cut(text: str, at: int) -> int:
    """The last grapheme boundary at or before `at` (never inside an emoji sequence, a flag
    or a letter with its accents), or `at` when one grapheme is longer than that."""
    cut = 0
    for match in _GRAPHEME.finditer(text, 0, at + 64):
        if match.end() > at:
            break
        cut = match.end()
    return cut or at


def _cut(rest: str, limit: int) -> int:
    window = rest[:limit]
    for sep in _BREAKS:
        at = window.rfind(sep)
        if at >= limit // 2:
            return at + len(sep)
    return _grapheme_cut(rest, limit)


def _open_fence(text: str) -> str | None:
    """The language ("" for none) of a code block left open at the end of `text`; None when
    every block is closed."""
    language: str | None = None
    at = 0
    while (found := text.find(_FENCE, at)) >= 0:
        if language is None:
            opened = _FENCE_LANGUAGE.match(text, found)
            language = opened.group(1) if opened else ""
        else:
            language = None
        at = found + len(_FENCE)
    return language


def split_text(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split `text` into parts of at most `limit` characters, at a paragraph, line, sentence
    or word boundary when one is in the second half of the window, else between graphemes. A
    code block cut in two is closed at the end of one part and opened again (with its
    language) at the start of the next, so each part renders as code. Stable as text grows: a
    part is fixed once the text extends past it, so streamed edits never rewrite finished
    parts."""
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = _cut(rest, limit)
        language = _open_fence(rest[:cut]) if limit >= _FENCE_ROOM else None
        if language is not None:  # leave room for the closing fence
            cut = _cut(rest, limit - len(_FENCE) - 1)
            language = _open_fence(rest[:cut])
        part = rest[:cut].rstrip() or rest[:cut]
        rest = rest[cut:]
        if language is not None:
            part = f"{part}\n{_FENCE}"
            rest = f"{_FENCE}{language}\n{rest.lstrip(chr(10))}"
        parts.append(part)
    parts.append(rest)
    return [p for p in parts if p.strip()] or [""]


@dataclass(frozen=True)
class Identity:
    """How a persona appears: the webhook's username and avatar."""

    name: str
    avatar_url: str | None = None


class WebhookCache:
    """One webhook per channel (the parent channel for threads), made by this bot."""

    def __init__(self, name: str = "Rolecast") -> None:
        self.name = webhook_username(name, fallback="Rolecast")
        self._hooks: dict[int, discord.Webhook] = {}
        self._plain: set[int] = set()
        # Every webhook this cache has held, one that was forgotten since too (deleted in
        # Discord and made again): posts through any of them are the bot's own (`is_own`).
        self._ever: set[int] = set()

    @staticmethod
    def _parent(channel: Messageable) -> discord.TextChannel | discord.VoiceChannel:
        parent = channel.parent if isinstance(channel, discord.Thread) else channel
        assert isinstance(parent, discord.TextChannel | discord.VoiceChannel | discord.ForumChannel)
        return parent  # type: ignore[return-value]

    def can_manage(self, channel: Messageable) -> bool:
        parent = self._parent(channel)
        me = parent.guild.me
        return me is not None and parent.permissions_for(me).manage_webhooks

    async def get(self, channel: Messageable) -> discord.Webhook | None:
        """The channel's webhook, or None when replies must go as plain messages."""
        parent = self._parent(channel)
        if parent.id in self._hooks:
            return self._hooks[parent.id]
        if not self.can_manage(channel):
            if parent.id not in self._plain:
                log.warning(
                    "no Manage Webhooks in #%s (%s): persona replies go as plain messages",
                    parent.name,
                    parent.id,
                )
                self._plain.add(parent.id)
            return None
        self._plain.discard(parent.id)
        try:
            me = parent.guild.me
            hooks = await parent.webhooks()
            hook = next(
                (
                    h
                    for h in hooks
                    if h.token and h.user is not None and me is not None and h.user.id == me.id
                ),
                None,
            )
            if hook is None:
                hook = await parent.create_webhook(name=self.name, reason="persona replies")
                log.info("created webhook %s in #%s", hook.id, parent.name)
        except discord.Forbidden:
            log.warning("Discord refused webhooks in #%s: using plain messages", parent.name)
            self._plain.add(parent.id)
            return None
        self._hooks[parent.id] = hook
        self._ever.add(hook.id)
        return hook

    def forget(self, channel: Messageable) -> None:
        self._hooks.pop(self._parent(channel).id, None)

    def cached(self, channel_id: int) -> discord.Webhook | None:
        return self._hooks.get(channel_id)

    def webhook_ids(self) -> set[int]:
        return {hook.id for hook in self._hooks.values()}

    def is_own(self, webhook_id: int) -> bool:
        """Whether a post with this webhook id is one of the bot's own (a persona reply), as
        opposed to another bot's, such as a proxy bot's (`bot.core.proxies`). The bot posts
        only through webhooks this cache handed out, so it holds every one of them."""
        return webhook_id in self._ever


class ReplyStream:
    """Posts one streamed reply as one or more messages under the persona's identity."""

    def __init__(
        self,
        channel: Messageable,
        webhooks: WebhookCache,
        identity: Identity,
        *,
        interval_s: float = 1.0,
        limit: int = MESSAGE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.webhooks = webhooks
        self.identity = identity
        self.interval_s = interval_s
        self.limit = limit
        self.clock = clock
        self.text = ""
        self.messages: list[discord.Message] = []
        self._shown: list[str] = []  # what each posted message currently says
        self._last_flush = float("-inf")
        self._hook: discord.Webhook | None = None
        self._resolved = False
        self.edits = 0  # sends and edits made, for tests and metrics

    @property
    def message_ids(self) -> list[str]:
        return [str(m.id) for m in self.messages]

    async def feed(self, delta: str) -> None:
        if not self.text:
            # The first post waits one interval too: a reply that is complete by then goes out
            # in one API call instead of a send and an edit (webhooks are rate-limited).
            self._last_flush = self.clock()
        self.text += delta
        if self.text.strip() and self.clock() - self._last_flush >= self.interval_s:
            await self.flush()

    async def finish(self, final_text: str | None = None, note: str | None = None) -> list[str]:
        """Show the whole reply, with `note` in italics under it when it did not finish
        ("cut at the token limit"); returns the ids of its messages."""
        if final_text is not None:
            self.text = final_text
        if note:
            self.text = f"{self.text}\n*[{note}]*"
        await self.flush()
        return self.message_ids

    async def cut(self, note: str) -> list[str]:
        """The reply was cut off while being written: when part of it was posted, show what
        arrived with `note` under it and return its messages' ids; else post nothing."""
        if not self.messages:
            return []
        return await self.finish(None, note)

    async def flush(self) -> None:
        self._last_flush = self.clock()
        if not self._hook_resolved():
            await self._resolve_hook()  # first: a plain message leaves room for the name
        parts = split_text(self.text, self._part_limit())
        for index, part in enumerate(parts):
            if not part.strip():
                continue
            if index < len(self._shown):
                if self._shown[index] != part:
                    await self._edit(index, part)
            else:
                await self._send(part)

    def _part_limit(self) -> int:
        # A plain message starts with the persona's name; leave room for it.
        return self.limit if self._hook is not None else self.limit - len(self._prefix())

    def _prefix(self) -> str:
        return f"**{plain_name(self.identity.name)}**\n"

    def _hook_resolved(self) -> bool:
        return self._resolved

    async def _resolve_hook(self) -> None:
        self._hook = await self.webhooks.get(self.channel)
        self._resolved = True

    def _plain(self, part: str, index: int) -> str:
        prefix = self._prefix()
        # (A part split for a webhook that has since vanished may leave no room for the name.)
        return prefix + part if index == 0 and len(prefix) + len(part) <= self.limit else part

    async def _send(self, part: str) -> None:
        index = len(self._shown)
        if self._hook is not None:
            try:
                message = await self._webhook_send(part)
            except discord.NotFound:
                # The webhook was deleted in Discord: make a new one and try once more.
                log.info("webhook for #%s is gone; recreating it", self.channel)
                self.webhooks.forget(self.channel)
                await self._resolve_hook()
                if self._hook is None:
                    message = await self.channel.send(
                        self._plain(part, index), allowed_mentions=NO_MENTIONS
                    )
                else:
                    message = await self._webhook_send(part)
        else:
            message = await self.channel.send(
                self._plain(part, index), allowed_mentions=NO_MENTIONS
            )
        self.messages.append(message)
        self._shown.append(part)
        self.edits += 1

    async def _webhook_send(self, part: str) -> discord.Message:
        assert self._hook is not None
        thread = self.channel if isinstance(self.channel, discord.Thread) else discord.utils.MISSING
        return await self._hook.send(
            part,
            username=webhook_username(self.identity.name),
            avatar_url=avatar_url(self.identity.avatar_url) or discord.utils.MISSING,
            allowed_mentions=NO_MENTIONS,
            wait=True,
            thread=thread,
        )

    async def _edit(self, index: int, part: str) -> None:
        message = self.messages[index]
        try:
            if isinstance(message, discord.WebhookMessage):
                await message.edit(content=part, allowed_mentions=NO_MENTIONS)
            else:
                await message.edit(content=self._plain(part, index), allowed_mentions=NO_MENTIONS)
        except discord.NotFound:
            # The message or its webhook vanished mid-stream: post the part anew.
            self.webhooks.forget(self.channel)
            await self._resolve_hook()
            del self.messages[index:]
            del self._shown[index:]
            await self._send(part)
            return
        self._shown[index] = part
        self.edits += 1
