"""Members editing and deleting their messages: the persona's memory follows
(`bot.core.edits` says what changes and why).

Discord's raw events, because the message may not be in the client's cache: it was sent before
a restart, or too long ago. Each event waits for the channel's messages that arrived before it
to be stored (the chat listener's intake queue, first come, first served), so a message edited
or deleted right after it was sent is found. Only a guild's messages count (direct messages are
never stored), and a message counts only in the channel and guild the event names.

A deletion may be a proxy bot's (PluralKit, Tupperbox: `bot.core.proxies`), which deletes a
member's message because it re-posted it through its webhook under a character's name. So the
other bots' webhook posts of the last `discord.proxy_window_s` seconds are kept (`ProxyWatch`,
bounded), and a member's stored message deleted is matched against them and, failing that,
against the posts that come in the window after it: a re-post found, its turn follows the
re-post (whose edits and deletion are then followed here too); none, the deletion is done, at
the end of the window. A bulk deletion is a moderator's purge, never a proxy's: done at once,
as is every deletion with a window of 0.

A deletion done, a reply being written from the deleted message is then not kept
(`ChatService.respond`), and a message deleted before its reply began is not answered
(`ChatListener.on_message`). Waiting for the window changes when that is: a reply that began
within the window after the deletion may be written and shown; stored, it leaves memory with
the message when the window ends (it is the reply that answered it), but stays shown on
Discord unmarked, as a reply finished before its message was deleted does. A proxy's re-post
does not stop a reply being written from the member's message (the words are the same); a
token count of the tagged text that reply stores with the turn errs by the tags, high. An edit also waits for the channel's reply in progress, if any:
that reply's prompt counted the old text (the count is stored with the reply) and its summary
may fold the old text in, so the edit comes after them and nothing written from the old text
is stored after it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.core.edits import message_edited, message_proxied, messages_deleted
from bot.core.proxies import Post, ProxyWatch
from bot.core.queue import ChannelQueue
from bot.core.text import clean_text
from bot.discord.bot import channel_key
from bot.discord.cogs.chat.listener import clean_content

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)


class MessageChanges(commands.Cog):
    def __init__(self, bot: RolecastBot, intake: ChannelQueue) -> None:
        self.bot = bot
        self.intake = intake  # the chat listener's: messages are stored in it
        self.proxies = ProxyWatch(bot.settings.discord.proxy_window_s)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Keep another bot's webhook post (a proxy bot's re-post, perhaps) for the window:
        at once, before any await, so that a deletion handled after it finds it."""
        if message.webhook_id is None or message.guild is None or not self.proxies.on:
            return
        if self.bot.webhooks.is_own(message.webhook_id) or self.bot.user is None:
            return  # a persona reply is never a member's message re-posted
        text = clean_content(message, self.bot.user.id)
        if text:
            post = Post(
                str(message.id),
                text,
                clean_text(message.author.display_name),
                self.proxies.clock(),
            )
            self.proxies.posted(channel_key(message.channel), post)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if payload.guild_id is not None and self.proxies.on:
            if await self._proxied(payload.guild_id, payload.channel_id, payload.message_id):
                return
        await self._deleted(payload.guild_id, payload.channel_id, [payload.message_id])

    async def _proxied(self, guild_id: int, channel_id: int, message_id: int) -> bool:
        """Whether a deleted message was a member's that a proxy bot re-posted, its turn now
        following the re-post. Waits for the window when the re-post has not come yet."""
        key = channel_key(discord.Object(channel_id))
        guild, message = str(guild_id), str(message_id)
        async with self.intake.slot(key):
            pass  # after the message itself is stored, if it is being stored now
        try:
            turns = await self.bot.memory.member_turns(guild, key, [message])
            if not turns:
                return False  # nothing remembered: nothing to keep or forget
            # (outside the intake slot: the channel's new messages are stored meanwhile)
            post = await self.proxies.reposted(key, turns[0].content)
            if post is None:
                return False
            return await message_proxied(self.bot.memory, guild, key, message, post) is not None
        except Exception:
            log.exception("channel %s: deleted message %s not matched to a proxy", key, message)
            return False

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._deleted(payload.guild_id, payload.channel_id, payload.message_ids)

    async def _deleted(
        self, guild_id: int | None, channel_id: int, message_ids: Iterable[int]
    ) -> None:
        ids = [str(m) for m in message_ids]
        if guild_id is None or not ids:
            return
        key = channel_key(discord.Object(channel_id))
        async with self.intake.slot(key):
            try:
                await messages_deleted(self.bot.memory, str(guild_id), key, ids)
            except Exception:
                log.exception("channel %s: deleted messages %s not forgotten", key, ids)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        data = payload.data
        # A message update without new text, or one its author did not make (a link preview
        # loading, a pin: Discord sends the message again, `edited_timestamp` unset), changes
        # nothing the persona remembers.
        if "content" not in data or not data.get("edited_timestamp"):
            return
        message = payload.message
        if payload.guild_id is None or self.bot.user is None:
            return
        if message.webhook_id is not None:
            if self.bot.webhooks.is_own(message.webhook_id):
                return  # a persona reply, edited as it streams
            # another bot's webhook post: followed when a member's turn was re-pointed at it,
            # a proxy bot's re-post (`pk;edit`); any other changes nothing stored
        elif message.author.bot:
            return  # bots' posts are never stored
        key = channel_key(discord.Object(payload.channel_id))
        # the new text as a new message is stored: mentions as names, unstorable characters
        # repaired
        text = clean_content(message, self.bot.user.id)
        async with self.intake.slot(key):
            pass  # after the message itself is stored, if it is being stored now
        async with self.bot.queue.slot(key):
            try:
                await message_edited(
                    self.bot.memory, str(payload.guild_id), key, str(payload.message_id), text
                )
            except Exception:
                log.exception("channel %s: edited message %s not followed", key, message.id)
