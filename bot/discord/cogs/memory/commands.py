"""`/memory show|reset|forget-me`: what the persona remembers, and forgetting it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.client import ending_note
from bot.core.forget import forget_member
from bot.core.memory import Turn
from bot.core.scene import Scene
from bot.discord import limits
from bot.discord.bot import NO_MENTIONS, channel_key, send_ephemeral
from bot.discord.permissions import guild_only
from bot.discord.webhooks import ReplyStream, split_text

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)

SHOWN_TURNS = 12


def _line(text: str, limit: int = 300) -> str:
    return limits.one_line(text, limit)


def _turn_line(turn: Turn, persona_name: str) -> str:
    who = persona_name if turn.role == "assistant" else (turn.author_name or "someone")
    note = ending_note(turn.finish_reason, turn.complete)
    mark = f" *[{note}]*" if note else ""
    return f"**{discord.utils.escape_markdown(_line(who, 80))}**: {_line(turn.content)}{mark}"


class ConfirmReset(discord.ui.View):
    """Two buttons under the private question; only the person who asked can press them."""

    def __init__(self, cog: MemoryCommands, owner_id: int, key: str) -> None:
        super().__init__(timeout=60)
        self.cog = cog
        self.owner_id = owner_id
        self.key = key
        self.done = False

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return interaction.user.id == self.owner_id

    @discord.ui.button(label="Delete the memory", style=discord.ButtonStyle.danger)
    async def confirm(
        self, interaction: discord.Interaction[RolecastBot], _: discord.ui.Button[ConfirmReset]
    ) -> None:
        self.done = True
        self.stop()
        await interaction.response.defer(ephemeral=True)
        deleted = await self.cog.reset(interaction, self.key)
        await interaction.followup.send(
            f"Forgot {deleted} turns of this channel's conversation.", ephemeral=True
        )

    @discord.ui.button(label="Keep it", style=discord.ButtonStyle.secondary)
    async def cancel(
        self, interaction: discord.Interaction[RolecastBot], _: discord.ui.Button[ConfirmReset]
    ) -> None:
        self.done = True
        self.stop()
        await interaction.response.send_message("Kept.", ephemeral=True)


class MemoryCommands(commands.GroupCog, group_name="memory"):
    """Look at and clear what the persona of a channel remembers."""

    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="show", description="The summary and recent turns remembered here.")
    @guild_only
    async def show(self, interaction: discord.Interaction[RolecastBot]) -> None:
        await interaction.response.defer(ephemeral=True)
        assert interaction.channel is not None
        key = channel_key(interaction.channel)
        persona = await self.bot.chat.persona(key)
        if persona is None:
            await send_ephemeral(interaction, "No persona is active in this channel.")
            return
        memory = self.bot.memory
        scene = await self.bot.scene(interaction)
        if scene.is_scene:
            await self._show_scene(interaction, key, scene)
            return
        summary = await memory.summary(key, persona.key)
        turns = list(reversed(await memory.recent_turns(key, persona.key, limit=SHOWN_TURNS)))
        total = await memory.count_turns(key)
        name = discord.utils.escape_markdown(_line(persona.name, 100))
        parts = [f"**{name}** remembers {total} turns in this channel."]
        if summary is not None:
            parts.append(f"**Summary of earlier turns**\n{_line(summary.content, 1500)}")
        if turns:
            lines = [_turn_line(t, persona.name) for t in turns]
            parts.append("**Recent turns**\n" + "\n".join(lines))
        await self._send(interaction, parts)

    async def _show_scene(
        self, interaction: discord.Interaction[RolecastBot], key: str, scene: Scene
    ) -> None:
        """A scene's memory: the shared turns under each speaker's name, each member's
        summary."""
        memory = self.bot.memory
        names = scene.names
        turns = list(reversed(await memory.recent_turns(key, scene.keys, limit=SHOWN_TURNS)))
        total = await memory.count_turns(key)
        cast = ", ".join(
            f"**{discord.utils.escape_markdown(_line(n, 60))}**" for n in names.values()
        )
        parts = [f"The scene here ({cast}) remembers {total} turns in this channel."]
        for persona in scene.members:
            summary = await memory.summary(key, persona.key)
            if summary is not None:
                name = discord.utils.escape_markdown(_line(persona.name, 100))
                parts.append(
                    f"**Summary of earlier turns, as {name} remembers them**\n"
                    f"{_line(summary.content, 1000)}"
                )
        if turns:
            lines = [_turn_line(t, names.get(t.persona, t.persona)) for t in turns]
            parts.append("**Recent turns**\n" + "\n".join(lines))
        await self._send(interaction, parts)

    async def _send(self, interaction: discord.Interaction[RolecastBot], parts: list[str]) -> None:
        text = "\n\n".join(parts)
        for chunk in split_text(text):
            await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="reset", description="Forget this channel's conversation.")
    @guild_only
    async def reset_command(self, interaction: discord.Interaction[RolecastBot]) -> None:
        assert interaction.channel is not None
        key = channel_key(interaction.channel)
        count = await self.bot.memory.count_turns(key)
        view = ConfirmReset(self, interaction.user.id, key)
        await interaction.response.send_message(
            f"Delete all {count} turns this channel's persona remembers? "
            "Approved training dialogues are kept.",
            view=view,
            ephemeral=True,
        )

    async def reset(self, interaction: discord.Interaction[RolecastBot], key: str) -> int:
        deleted = await self.bot.chat.reset(key)
        log.info("channel %s reset by %s (%d turns)", key, interaction.user.id, deleted)
        persona = await self.bot.chat.persona(key)
        channel = interaction.channel
        scene = await self.bot.scene(interaction)
        if scene.is_scene and isinstance(
            channel, discord.TextChannel | discord.Thread | discord.VoiceChannel
        ):
            greetings = await self.bot.chat.greetings(key, user_name=interaction.user.display_name)
            for hello in greetings:
                member = scene.member(hello.persona)
                if member is None:
                    continue
                stream = ReplyStream(channel, self.bot.webhooks, self.bot.identity(member))
                ids = await stream.finish(hello.content)
                await self.bot.memory.link_messages(hello.id, ids)
        elif persona is not None and isinstance(
            channel, discord.TextChannel | discord.Thread | discord.VoiceChannel
        ):
            greeting = await self.bot.chat.set_persona(
                key, persona.key, user_name=interaction.user.display_name
            )
            if greeting is not None:
                stream = ReplyStream(channel, self.bot.webhooks, self.bot.identity(persona))
                ids = await stream.finish(greeting.content)
                await self.bot.memory.link_messages(greeting.id, ids)
        return deleted

    @app_commands.command(
        name="forget-me", description="Delete everything you said in this server, everywhere."
    )
    @guild_only
    async def forget_me(self, interaction: discord.Interaction[RolecastBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        assert interaction.guild_id is not None
        report = await forget_member(
            self.bot.memory,
            str(interaction.guild_id),
            str(interaction.user.id),
            workdirs=[self.bot.settings.retrain_dir],
        )
        await send_ephemeral(interaction, report.summary())
