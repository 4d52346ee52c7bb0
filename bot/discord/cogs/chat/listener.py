"""The chat listener: a channel's persona answers mentions, replies to its own messages, or —
in `always` channels — every message.

Order of work for one message: store the user's turn (so nothing is lost), then wait for the
channel's slot (one generation per channel, in order), then stream the reply through the
persona's webhook and store it with the messages it became. A burst of messages from one
person in an `always` channel gets one answer: the job waits until its author has been quiet
for `burst_window_s`, and a job whose message was already in an earlier reply's prompt is
dropped. Bots and webhooks are never answered.

In a scene (a channel with several personas, `/scene`), a message is also heard when it names
a member, and the members it addresses answer it, each through the webhook under its own name
(`bot.core.scene` says who, `bot.core.director` plays the replies and the chain after them).
Any member's message ends a chain of personas answering one another in that channel.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.core.chat import Reply, Speaker
from bot.core.director import Director, mark_discarded
from bot.core.memory import ChannelSettings, Turn
from bot.core.personas import Persona
from bot.core.queue import ChannelQueue
from bot.core.scene import Scene
from bot.core.text import blank, clean_text
from bot.discord import limits
from bot.discord.bot import NO_MENTIONS, channel_key, permission_message
from bot.discord.webhooks import ReplyStream
from bot.errors import (
    ConversationGoneError,
    InputTooLongError,
    ModelAnswerError,
    ModelServerError,
    RolecastError,
)

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
NOT_STORED_NOTICE = (
    "⚠️ I could not save your message (a problem with my storage; the error was logged), so "
    "the persona cannot answer it. Please send it again later."
)
NO_TEXT_NOTICE = (
    "I can only read the text of a message, and yours has none (an image, a file, a sticker "
    "or only spaces): write what you want to say."
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


@dataclass(frozen=True)
class _Job:
    """A stored message that gets an answer: who answers it, and the channel's settings."""

    turn: Turn
    persona: Persona  # the (first) persona that answers
    settings: ChannelSettings
    scene: Scene | None = None  # a channel with several personas
    answering: tuple[Persona, ...] = ()  # in a scene, every member that answers, in order


class _SceneStage:
    """The Discord side of a scene's replies: each member's webhook stream, and notices."""

    def __init__(
        self, listener: ChatListener, message: discord.Message, channel: ChatChannel, turn: Turn
    ) -> None:
        self.listener = listener
        self.message = message
        self.channel = channel
        self.turn = turn
        self.replies: list[tuple[Persona, Reply]] = []
        self._told: set[str] = set()  # notices already posted for this message

    def perform(self, persona: Persona) -> ReplyStream:
        bot = self.listener.bot
        return ReplyStream(
            self.channel,
            bot.webhooks,
            bot.identity(persona),
            interval_s=bot.settings.discord.edit_interval_s,
        )

    async def replied(self, persona: Persona, reply: Reply) -> None:
        self.replies.append((persona, reply))

    async def failed(self, persona: Persona, error: Exception) -> None:
        await self.listener._report(self.message, self.turn.id, error, told=self._told)


class ChatListener(commands.Cog):
    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        self._last_seen: dict[tuple[str, int], float] = {}  # (channel, author) -> time
        self._answered: dict[str, int] = {}  # channel -> newest turn id a reply has seen
        self._pending: dict[tuple[str, int], int] = {}  # (channel, author) -> jobs waiting
        # A channel's messages are stored one at a time, in the order they arrived (see
        # `on_message`); edits and deletions of messages take their turn in it too
        # (`MessageChanges`), so they come after the message they change is stored.
        self.intake = ChannelQueue()
        self._playing: dict[str, Director] = {}  # channel -> the scene answering there now

    async def cog_unload(self) -> None:
        self._last_seen.clear()
        self._pending.clear()

    # -- triggers -----------------------------------------------------------------------

    async def _replies_to_persona(self, message: discord.Message) -> bool:
        return await self._replied_turn(message) is not None

    async def _replied_turn(self, message: discord.Message) -> Turn | None:
        """The persona reply `message` replies to (through the messages it was posted as)."""
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        return await self.bot.memory.turn_by_message(str(ref.message_id))

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id is not None or message.guild is None:
            return
        if not isinstance(message.channel, ChatChannel) or self.bot.user is None:
            return
        key = channel_key(message.channel)
        playing = self._playing.get(key)
        if playing is not None:
            playing.interrupt()  # a person spoke: personas stop answering one another
        # Each message takes the channel's intake slot before its first await: the slot is
        # first come, first served, so turns are stored in the order the messages arrived,
        # however many awaits each message's checks take (a reply-to check or recording the
        # channel's guild would otherwise let a later message overtake an earlier one).
        async with self.intake.slot(key):
            try:
                stored = await self._store(message, key)
            except Exception:
                # The database is locked, read-only, full or broken: a member who called the
                # persona hears that their message was not kept, rather than nothing at all
                # (the others' chatter, which may not have been for it, only goes to the log).
                log.exception("channel %s: message %s could not be stored", key, message.id)
                if any(u.id == self.bot.user.id for u in message.mentions):
                    await self._notice(message, NOT_STORED_NOTICE)
                return
        if stored is None:
            return
        turn, settings = stored.turn, stored.settings
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
                if not await self.bot.memory.all_stored([turn.id]):
                    return  # its author deleted it while it waited: nothing to answer
                if stored.scene is not None:
                    await self._play(message, stored)
                else:
                    await self._answer(message, stored.persona, turn, settings)
        finally:
            if self._pending.get(who) == 0:
                del self._pending[who]

    async def _store(self, message: discord.Message, key: str) -> _Job | None:
        """Store a message that triggers the persona as a user turn; None when it does not."""
        assert self.bot.user is not None and message.guild is not None
        memory = self.bot.memory
        settings = await memory.channel_settings(key)
        if len(settings.cast) > 1:
            guild = str(message.guild.id)
            scene = Scene.of(
                settings,
                self.bot.personas,
                allowed=lambda p: p.guild_id in (None, guild),  # never another server's
            )
            if scene.is_scene:
                return await self._store_in_scene(message, key, settings, scene)
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
        if blank(text):
            if mentioned:
                await self._notice(message, NO_TEXT_NOTICE)
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
        return _Job(turn, persona, settings)

    async def _store_in_scene(
        self, message: discord.Message, key: str, settings: ChannelSettings, scene: Scene
    ) -> _Job | None:
        """Store a message in a scene when it addresses members (replies to one, names one)
        or calls for an answer (a mention, an `always` channel): `ChatService.hear`."""
        assert self.bot.user is not None and message.guild is not None
        mentioned = any(u.id == self.bot.user.id for u in message.mentions)
        replied = await self._replied_turn(message)
        text = clean_content(message, self.bot.user.id)
        if blank(text):
            if mentioned:
                await self._notice(message, NO_TEXT_NOTICE)
            return None
        heard = await self.bot.chat.hear(
            key,
            text,
            Speaker(str(message.author.id), message.author.display_name),
            scene,
            answer=mentioned or settings.mode == "always" or replied is not None,
            replied_to=replied.persona if replied is not None else None,
            message_id=str(message.id),
        )
        if heard is None:
            return None
        if settings.guild_id is None:
            await self.bot.memory.set_channel_guild(key, str(message.guild.id))
        answering = tuple(heard.answering)
        return _Job(heard.turn, answering[0], settings, scene, answering)

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
        except ConversationGoneError as exc:
            if not await mark_discarded(stream, key):
                await self._report(message, turn.id, exc)
            return
        except Exception as exc:
            await self._report(message, turn.id, exc)
            return
        await self._answered_by(key, persona, reply)

    async def _play(self, message: discord.Message, job: _Job) -> None:
        """Answer a message in a scene: every member it addresses, then the chain."""
        channel = message.channel
        assert isinstance(channel, ChatChannel) and job.scene is not None
        key = channel_key(channel)
        bot = self.bot
        perms = channel.permissions_for(channel.guild.me)
        if not (perms.send_messages or perms.manage_webhooks):
            await self._permission_problem(message, "missing Send Messages and Manage Webhooks")
            return
        scene, base = job.scene, bot.sampling_for(job.settings)
        stage = _SceneStage(self, message, channel, job.turn)
        director = Director(
            bot.chat,
            key,
            scene,
            stage,
            sampling=lambda persona: scene.sampling_for(persona, base),
            user_name=clean_text(message.author.display_name),
        )
        self._playing[key] = director
        try:
            await director.play(job.turn, job.answering)
        finally:
            if self._playing.get(key) is director:
                del self._playing[key]
        for persona, reply in stage.replies:
            await self._answered_by(key, persona, reply, scene=scene)

    async def _answered_by(
        self, key: str, persona: Persona, reply: Reply, *, scene: Scene | None = None
    ) -> None:
        """After a reply was stored: what its prompt saw, the server is up, the summary."""
        bot = self.bot
        if reply.prompt.newest_id is not None:
            self._answered[key] = max(self._answered.get(key, 0), reply.prompt.newest_id)
        bot.down_notified.discard(key)
        if bot.settings.prompt.summaries:
            cast = scene.names if scene is not None else None
            try:
                await bot.summarizer.update(key, persona.key, persona.name, reply.prompt, cast=cast)
            except RolecastError as exc:
                log.warning("channel %s: summary not updated: %s", key, exc)
            except Exception:
                log.exception("channel %s: summary not updated", key)

    async def _report(
        self,
        message: discord.Message,
        turn_id: int,
        error: Exception,
        *,
        told: set[str] | None = None,
    ) -> None:
        """Tell the member why there is no reply (once per notice, with `told`); whatever went
        wrong, the member hears about it and their turn stays stored."""
        key = channel_key(message.channel)
        bot = self.bot

        async def notice(text: str) -> None:
            if told is not None:
                if text in told:
                    return
                told.add(text)
            await self._notice(message, text)

        if isinstance(error, ModelAnswerError):
            log.warning("channel %s: %s", key, error)
            await notice(UNREADABLE_ANSWER_NOTICE)
        elif isinstance(error, ModelServerError):
            log.warning("channel %s: %s", key, error)
            if key not in bot.down_notified:
                bot.down_notified.add(key)
                await notice(SERVER_DOWN_NOTICE)
        elif isinstance(error, InputTooLongError):
            await bot.memory.delete_turn(turn_id)
            await notice(str(error))
        elif isinstance(error, RolecastError):
            await notice(str(error))
        elif isinstance(error, discord.Forbidden):
            await self._permission_problem(message, error.text or "forbidden")
        elif isinstance(error, discord.HTTPException):
            log.warning("channel %s: Discord refused the reply: %s", key, error)
            await notice(FAILURE_NOTICE)
        else:
            log.exception(
                "channel %s: answering message %s failed", key, message.id, exc_info=error
            )
            await notice(FAILURE_NOTICE)

    # -- telling people --------------------------------------------------------------------

    async def _notice(self, message: discord.Message, text: str) -> None:
        """A short plain message from the bot itself (not in the persona's voice), as a reply
        to the member's message; a plain message when that was deleted meanwhile (Discord
        refuses a reply to a deleted message unless told not to fail)."""
        try:
            await message.channel.send(
                limits.message(text),
                reference=message.to_reference(fail_if_not_exists=False),
                allowed_mentions=NO_MENTIONS,
                mention_author=False,
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
