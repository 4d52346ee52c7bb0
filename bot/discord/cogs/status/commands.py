"""`/status`: the model server, what each persona is served by, and the queue."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord import limits
from bot.discord.permissions import admin_only
from bot.errors import RolecastError

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)


class StatusCommands(commands.Cog):
    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot

    @app_commands.command(name="status", description="Model server health, adapters and queue.")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admin_only
    async def status(self, interaction: discord.Interaction[RolecastBot]) -> None:
        await interaction.response.defer(ephemeral=True)
        bot = self.bot
        healthy = await bot.client.health()
        embed = discord.Embed(title="Rolecast status")
        embed.add_field(
            name="Model server",
            value=f"{'up' if healthy else 'DOWN'} — {bot.client.root_url}",
            inline=False,
        )
        lines = []
        for persona in bot.personas.all():
            try:
                served = await bot.chat.served_by(persona) if healthy else "—"
            except RolecastError:
                served = "—"
            approved = await bot.memory.count_dialogues(persona.key)
            lines.append(f"`{persona.key}` → {served} · {approved} approved")
        embed.add_field(name="Personas", value="\n".join(lines)[:1024] or "none", inline=False)
        embed.add_field(
            name="Queue",
            value=f"{bot.queue.depth()} replies waiting or running in "
            f"{bot.queue.busy_channels()} channels",
            inline=False,
        )
        await interaction.followup.send(embed=limits.fit_embed(embed), ephemeral=True)
