"""Members editing and deleting their messages: the persona's memory follows
(`bot.core.edits` says what changes and why).

Discord's raw events, because the message may not be in the client's cache: it was sent before
a restart, or too long ago. Each event waits for the channel's messages that arrived before it
to be stored (the chat listener's intake queue, first come, first served), so a message edited
or deleted right after it was sent is found. Only a guild's messages count (direct messages are
never stored), and a message counts only in the channel and guild the event names.

A deletion is done at once; a reply being written from the deleted message is then not kept
(`ChatService.respond`), and a message deleted before its reply began is not answered
(`ChatListener.on_message`). An edit also waits for the channel's reply in progress, if any:
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

from bot.core.edits import message_edited, messages_deleted
from bot.core.queue import ChannelQueue
from bot.discord.bot import channel_key
from bot.discord.cogs.chat.listener import clean_content

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)


class MessageChanges(commands.Cog):
    def __init__(self, bot: RolecastBot, intake: ChannelQueue) -> None:
        self.bot = bot
        self.intake = intake  # the chat listener's: messages are stored in it

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._deleted(payload.guild_id, payload.channel_id, [payload.message_id])

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
        if message.author.bot or message.webhook_id is not None:
            return  # the bot's own posts (persona replies are edited as they stream), bots
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
