"""The chat listener: a channel's persona answers mentions, replies to its own messages, or —
in `always` channels — every message.

Order of work for one message: store the user's turn (so nothing is lost), then wait for the
channel's slot (one generation per channel, in order), then stream the reply through the
persona's webhook and store it with the messages it became. A burst of messages from one
person in an `always` channel gets one answer: the job waits until its author has been quiet
for `burst_window_s`, and a job whose message was already in an earlier reply's prompt is
dropped. Bots and webhooks are never answered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.core.chat import Reply
from bot.core.memory import ChannelSettings, Turn
from bot.core.personas import Persona
from bot.core.queue import ChannelQueue
from bot.core.text import clean_text
from bot.discord import limits
from bot.discord.bot import NO_MENTIONS, channel_key, permission_message
from bot.discord.webhooks import ReplyStream
from bot.errors import InputTooLongError, ModelAnswerError, ModelServerError, RolecastError

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)

SERVER_DOWN_NOTICE = (
    "⚠️ The model server is not answering right now. Your message is saved; "
    "the persona will answer your next message once the server is back."
)
UNREADABLE_ANSWER_NOTICE = (
    "⚠️ The model server sent an answer I could not read, so there is no reply this time. "
    "Your message is saved; write again to get an answer."
)
FAILURE_NOTICE = (
    "⚠️ Something went wrong on my side while answering; the error was logged. "
    "Your message is saved."
)
COOLDOWN_EMOJI = "⏳"
ChatChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _: text


def clean_content(message: discord.Message, bot_id: int) -> str:
    """The message text as the persona should read it: the bot's own mention removed, other
    mentions replaced by display names, characters that cannot be stored repaired."""
    text = re.sub(rf"<@!?{bot_id}>", "", message.content)
    for user in message.mentions:
        # A name is text, never a replacement pattern ("\\1" in a name is not a group).
        text = re.sub(rf"<@!?{user.id}>", _literal(f"@{user.display_name}"), text)
    for role in message.role_mentions:
        text = text.replace(f"<@&{role.id}>", f"@{role.name}")
    for channel in message.channel_mentions:
        text = text.replace(f"<#{channel.id}>", f"#{channel.name}")
    return clean_text(text).strip()


class ChatListener(commands.Cog):
    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        self._last_seen: dict[tuple[str, int], float] = {}  # (channel, author) -> time
        self._answered: dict[str, int] = {}  # channel -> newest turn id a reply has seen
        self._pending: dict[tuple[str, int], int] = {}  # (channel, author) -> jobs waiting
        # A channel's messages are stored one at a time, in the order they arrived (see
        # `on_message`).
        self._intake = ChannelQueue()

    async def cog_unload(self) -> None:
        self._last_seen.clear()
        self._pending.clear()

    # -- triggers -----------------------------------------------------------------------

    async def _replies_to_persona(self, message: discord.Message) -> bool:
        ref = message.reference
        if ref is None or ref.message_id is None:
            return False
        return await self.bot.memory.turn_by_message(str(ref.message_id)) is not None

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id is not None or message.guild is None:
            return
        if not isinstance(message.channel, ChatChannel) or self.bot.user is None:
            return
        key = channel_key(message.channel)
        # Each message takes the channel's intake slot before its first await: the slot is
        # first come, first served, so turns are stored in the order the messages arrived,
        # however many awaits each message's checks take (a reply-to check or recording the
        # channel's guild would otherwise let a later message overtake an earlier one).
        async with self._intake.slot(key):
            stored = await self._store(message, key)
        if stored is None:
            return
        turn, persona, settings = stored
        who = (key, message.author.id)
        self._last_seen[who] = time.monotonic()
        burst = settings.mode == "always" and self.bot.settings.discord.burst_window_s > 0
        if burst and self._pending.get(who):
            return  # a job for this person's burst is already waiting; it will see this turn
        if self.bot.cooldown.hit(f"{message.guild.id}:{message.author.id}") > 0:
            # Kept in memory; answered with the next reply rather than on its own.
            await self._react(message, COOLDOWN_EMOJI)
            return
        self._pending[who] = self._pending.get(who, 0) + 1
        try:
            async with self.bot.queue.slot(key):
                self._pending[who] -= 1
                if burst:
                    await self._wait_for_quiet(who)
                if turn.id <= self._answered.get(key, 0):
                    return  # an earlier reply already had this message in its prompt
                await self._answer(message, persona, turn, settings)
        finally:
            if self._pending.get(who) == 0:
                del self._pending[who]

    async def _store(
        self, message: discord.Message, key: str
    ) -> tuple[Turn, Persona, ChannelSettings] | None:
        """Store a message that triggers the persona as a user turn; None when it does not."""
        assert self.bot.user is not None and message.guild is not None
        memory = self.bot.memory
        settings = await memory.channel_settings(key)
        mentioned = any(u.id == self.bot.user.id for u in message.mentions)
        triggered = (
            mentioned or settings.mode == "always" or await self._replies_to_persona(message)
        )
        if not triggered:
            return None
        persona = self.bot.chat.persona_by_key(settings.persona)
        if persona is not None and persona.guild_id not in (None, str(message.guild.id)):
            persona = None  # another server's persona is never heard here
        if persona is None:
            if mentioned:
                await self._notice(
                    message,
                    "No persona is active in this channel yet: choose one with /persona set.",
                )
            return None
        text = clean_content(message, self.bot.user.id)
        if not text:
            return None
        if settings.guild_id is None:
            await memory.set_channel_guild(key, str(message.guild.id))
        turn = await memory.add_turn(
            key,
            persona=persona.key,
            role="user",
            content=text,
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            message_id=str(message.id),
        )
        return turn, persona, settings

    async def _wait_for_quiet(self, who: tuple[str, int]) -> None:
        window = self.bot.settings.discord.burst_window_s
        while True:
            quiet = time.monotonic() - self._last_seen.get(who, 0.0)
            if quiet >= window:
                return
            await asyncio.sleep(window - quiet)

    # -- answering -------------------------------------------------------------------------

    async def _answer(
        self, message: discord.Message, persona: Persona, turn: Turn, settings: ChannelSettings
    ) -> None:
        channel = message.channel
        assert isinstance(channel, ChatChannel)
        key = channel_key(channel)
        bot = self.bot
        me = channel.guild.me
        perms = channel.permissions_for(me)
        if not (perms.send_messages or perms.manage_webhooks):
            await self._permission_problem(message, "missing Send Messages and Manage Webhooks")
            return
        stream = ReplyStream(
            channel,
            bot.webhooks,
            bot.identity(persona),
            interval_s=bot.settings.discord.edit_interval_s,
        )
        reply: Reply | None = None
        try:
            async for event in bot.chat.respond(
                key,
                bot.sampling_for(settings),
                user_name=clean_text(message.author.display_name),
                persona=persona,
                deliver=stream.finish,
            ):
                if isinstance(event, Reply):
                    reply = event
                else:
                    await stream.feed(event)
            assert reply is not None
        except ModelAnswerError as exc:
            log.warning("channel %s: %s", key, exc)
            await self._notice(message, UNREADABLE_ANSWER_NOTICE)
            return
        except ModelServerError as exc:
            log.warning("channel %s: %s", key, exc)
            if key not in bot.down_notified:
                bot.down_notified.add(key)
                await self._notice(message, SERVER_DOWN_NOTICE)
            return
        except InputTooLongError as exc:
            await bot.memory.delete_turn(turn.id)
            await self._notice(message, str(exc))
            return
        except RolecastError as exc:
            await self._notice(message, str(exc))
            return
        except discord.Forbidden as exc:
            await self._permission_problem(message, exc.text or "forbidden")
            return
        except discord.HTTPException as exc:
            log.warning("channel %s: Discord refused the reply: %s", key, exc)
            await self._notice(message, FAILURE_NOTICE)
            return
        except Exception:
            # Whatever went wrong, the member hears about it and the turn stays stored.
            log.exception("channel %s: answering message %s failed", key, message.id)
            await self._notice(message, FAILURE_NOTICE)
            return
        if reply.prompt.newest_id is not None:
            self._answered[key] = max(self._answered.get(key, 0), reply.prompt.newest_id)
        bot.down_notified.discard(key)
        if bot.settings.prompt.summaries:
            try:
                await bot.summarizer.update(key, persona.key, persona.name, reply.prompt)
            except RolecastError as exc:
                log.warning("channel %s: summary not updated: %s", key, exc)
            except Exception:
                log.exception("channel %s: summary not updated", key)

    # -- telling people --------------------------------------------------------------------

    async def _notice(self, message: discord.Message, text: str) -> None:
        """A short plain message from the bot itself (not in the persona's voice)."""
        try:
            await message.reply(
                limits.message(text), allowed_mentions=NO_MENTIONS, mention_author=False
            )
        except discord.Forbidden as exc:
            await self._permission_problem(message, exc.text or "forbidden")
        except discord.HTTPException as exc:
            log.warning("could not post a notice in %s: %s", message.channel, exc)

    async def _react(self, message: discord.Message, emoji: str) -> None:
        try:
            await message.add_reaction(emoji)
        except discord.HTTPException:
            log.debug("could not react in %s", message.channel)

    async def _permission_problem(self, message: discord.Message, reason: str) -> None:
        """One clear message to the person who asked (by DM, since the channel refuses us),
        and a log line."""
        where = f"#{getattr(message.channel, 'name', message.channel.id)}"
        log.warning(
            "missing permissions in %s (%s) of guild %s: %s",
            where,
            message.channel.id,
            message.guild.id if message.guild else "-",
            reason,
        )
        try:
            await message.author.send(
                limits.message(
                    permission_message(
                        reason, f"{where} on {message.guild.name if message.guild else ''}"
                    )
                ),
                allowed_mentions=NO_MENTIONS,
            )
        except discord.HTTPException:
            log.info("could not DM %s about missing permissions either", message.author.id)
