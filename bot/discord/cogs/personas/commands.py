"""`/persona set|list|info` for members, `/persona import|remove` for admins.

A server sees the shared personas (shipped, or imported by the operator) and its own: what an
admin imports belongs to that server (`bot.core.personas`), and only that server's admins can
replace or remove it. The shared ones are read-only from Discord.
"""

from __future__ import annotations

import logging
from pathlib import PurePath
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.cards import MAX_CARD_BYTES, parse_card
from bot.core.chat import describe_model
from bot.core.personas import Persona, guild_key, persona_key
from bot.discord import limits
from bot.discord.bot import channel_key, send_ephemeral
from bot.discord.permissions import admin_only, guild_only
from bot.discord.webhooks import ReplyStream
from bot.errors import CardError, RolecastError

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)


def _short(text: str, limit: int) -> str:
    return limits.one_line(text, limit)


def shown_name(name: str) -> str:
    """A name (a card's, a file's) as bold text in a message: one line, at most 100
    characters, markdown escaped."""
    return discord.utils.escape_markdown(limits.one_line(name, 100))


def info_embed(persona: Persona, served: str) -> discord.Embed:
    """What `/persona info` shows of a card, within Discord's embed limits."""
    data = persona.card.data
    title = limits.one_line(persona.name, limits.EMBED_TITLE_CHARS - len(persona.short_key) - 3)
    embed = discord.Embed(title=f"{title} ({persona.short_key})")
    embed.description = _short(data.description or data.system_prompt or "—", 1000)
    if data.personality.strip():
        embed.add_field(name="Personality", value=_short(data.personality, 500), inline=False)
    if data.scenario.strip():
        embed.add_field(name="Scenario", value=_short(data.scenario, 500), inline=False)
    if data.first_mes.strip():
        embed.add_field(name="Greeting", value=_short(data.first_mes, 500), inline=False)
    book = data.character_book
    embed.add_field(name="Lorebook entries", value=str(len(book.entries) if book else 0))
    embed.add_field(name="Spec", value=persona.card.spec)
    embed.add_field(name="Served by", value=served)
    if data.creator_notes.strip():
        embed.set_footer(text=_short(data.creator_notes, 1000))
    return limits.fit_embed(embed)


class PersonaCommands(commands.GroupCog, group_name="persona"):
    """Choose, inspect, import and remove personas."""

    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        super().__init__()

    async def persona_autocomplete(
        self, interaction: discord.Interaction[RolecastBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return self.bot.persona_choices(current, interaction.guild_id)

    @app_commands.command(name="set", description="Make a persona this channel's character.")
    @app_commands.describe(name="The persona (start typing to search)")
    @guild_only
    async def set_persona(self, interaction: discord.Interaction[RolecastBot], name: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        channel = interaction.channel
        key = channel_key(channel) if channel is not None else ""
        user_name = interaction.user.display_name
        persona = self.bot.persona_for(interaction, name)
        scene = await self.bot.scene(interaction)
        if scene.is_scene:
            cast = ", ".join(f"{shown_name(p.name)} ({p.short_key})" for p in scene.members)
            raise RolecastError(
                f"This channel has a scene: {cast}. Its cast changes with /scene add and "
                "/scene remove (admins); /scene next hands the next turn to one of them."
            )
        greeting = await self.bot.chat.set_persona(key, persona.key, user_name=user_name)
        await self.bot.memory.set_channel_guild(key, str(interaction.guild_id))
        try:
            served = (
                f" It answers through {describe_model(await self.bot.chat.served_by(persona))}."
            )
        except RolecastError:
            served = ""  # the server is down: the first message says so
        await send_ephemeral(
            interaction,
            f"**{shown_name(persona.name)}** ({persona.short_key}) is now the persona of this "
            "channel." + served,
        )
        if greeting is not None and isinstance(
            channel, discord.TextChannel | discord.Thread | discord.VoiceChannel
        ):
            stream = ReplyStream(channel, self.bot.webhooks, self.bot.identity(persona))
            ids = await stream.finish(greeting.content)
            await self.bot.memory.link_messages(greeting.id, ids)

    set_persona.autocomplete("name")(persona_autocomplete)

    @app_commands.command(name="list", description="The personas you can choose.")
    async def list_personas(self, interaction: discord.Interaction[RolecastBot]) -> None:
        guild = str(interaction.guild_id) if interaction.guild_id is not None else None

        def origin(p: Persona) -> str:
            if p.builtin:
                return ""
            return " — this server's" if p.guild_id is not None else " — shared"

        lines = [
            f"• **{shown_name(p.name)}** (`{p.short_key}`){origin(p)}"
            for p in self.bot.personas.visible(guild)
        ]
        await send_ephemeral(interaction, "\n".join(lines) or "No personas yet.")

    @app_commands.command(name="info", description="What a persona's card says.")
    @app_commands.describe(name="The persona")
    async def info(self, interaction: discord.Interaction[RolecastBot], name: str) -> None:
        await interaction.response.defer(ephemeral=True)
        persona = self.bot.persona_for(interaction, name)
        try:
            served = describe_model(await self.bot.chat.served_by(persona))
        except RolecastError:
            served = "model server not answering"
        embed = info_embed(persona, served)
        await interaction.followup.send(embed=embed, ephemeral=True)

    info.autocomplete("name")(persona_autocomplete)

    @app_commands.command(
        name="import", description="Add a Character Card V2/V3 (JSON or PNG). Admins only."
    )
    @app_commands.describe(
        card="The card file (.json or .png)",
        key="Short name to use (default: from the file)",
        replace="Replace this server's persona of the same key",
    )
    @app_commands.default_permissions(manage_guild=True)
    @admin_only
    async def import_card(
        self,
        interaction: discord.Interaction[RolecastBot],
        card: discord.Attachment,
        key: str | None = None,
        replace: bool = False,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        if card.size > MAX_CARD_BYTES:
            raise RolecastError(
                f"{card.filename} is {card.size // 1024} KiB; cards must be under "
                f"{MAX_CARD_BYTES // 1024 // 1024} MiB."
            )
        raw = await card.read()
        try:
            parsed = parse_card(raw, source=card.filename)
        except CardError as exc:
            problems = "\n".join(f"• {limits.one_line(p, 300)}" for p in exc.problems[:20])
            more = len(exc.problems) - 20
            if more > 0:
                problems += f"\n… and {more} more"
            await send_ephemeral(
                interaction,
                f"**{shown_name(card.filename)}** is not a usable character card:\n{problems}",
            )
            return
        assert interaction.guild_id is not None  # admin_only refuses direct messages
        guild = str(interaction.guild_id)
        new_key = persona_key(key or PurePath(card.filename).stem)
        replaced = guild_key(guild, new_key) in self.bot.personas
        # the server's own persona: another server's of the same key is another persona
        persona = self.bot.personas.add(new_key, parsed, guild_id=guild, replace=replace)
        log.info("persona %s imported by %s", persona.key, interaction.user.id)
        await send_ephemeral(
            interaction,
            f"{'Replaced' if replaced else 'Imported'} **{shown_name(persona.name)}** as "
            f"`{persona.short_key}` ({parsed.spec}) for this server. Use /persona set to bring "
            "it into a channel.",
        )

    @app_commands.command(name="remove", description="Delete an imported persona. Admins only.")
    @app_commands.describe(name="The imported persona")
    @app_commands.default_permissions(manage_guild=True)
    @admin_only
    async def remove(self, interaction: discord.Interaction[RolecastBot], name: str) -> None:
        await interaction.response.defer(ephemeral=True)
        persona = self.bot.persona_for(interaction, name)
        if persona.shared:
            raise RolecastError(
                f"**{shown_name(persona.name)}** (`{persona.short_key}`) is shared by every "
                "server and cannot be removed from Discord: the bot's operator removes it "
                "(`rolecast persona remove`)."
            )
        self.bot.personas.remove(persona.key)
        # The registry key is this server's own (`g<server>-<key>`): only this server's
        # channels (and a terminal session the operator opened with it) can have it.
        channels = await self.bot.memory.clear_persona_everywhere(persona.key)
        log.info("persona %s removed by %s", persona.key, interaction.user.id)
        await send_ephemeral(
            interaction,
            f"Removed **{shown_name(persona.name)}** (`{persona.short_key}`); {channels} "
            "channel(s) no longer have a persona. Its conversations and approved dialogues are "
            "kept.",
        )

    remove.autocomplete("name")(persona_autocomplete)
