"""`/status`: the model server, what each persona this server sees is served by, and this
server's approvals, retrain jobs and queue (never another server's)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord import limits
from bot.discord.bot import channel_key
from bot.discord.permissions import admin_only
from bot.errors import RolecastError
from bot.retrain.jobs import JobStore

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
        guild = interaction.guild
        assert guild is not None  # admin_only refuses direct messages
        lines = []
        for persona in bot.personas.visible(str(guild.id)):
            try:
                served = await bot.chat.served_by(persona) if healthy else "—"
            except RolecastError:
                served = "—"
            approved = await bot.memory.count_dialogues(persona.key, guild_id=str(guild.id))
            lines.append(f"`{persona.short_key}` → {served} · {approved} approved here")
        embed.add_field(name="Personas", value="\n".join(lines)[:1024] or "none", inline=False)
        jobs = [
            j for j in await JobStore(bot.memory.db).unfinished() if j.guild_id == str(guild.id)
        ]
        shown_jobs = [
            f"#{j.id} {bot.personas.get(j.persona).short_key if j.persona in bot.personas else '?'}"
            f" — {j.state}"
            for j in jobs
        ]
        embed.add_field(
            name="Retrain jobs", value="\n".join(shown_jobs)[:1024] or "none running", inline=False
        )
        keys = {channel_key(c) for c in [*guild.channels, *guild.threads]}
        waiting = sum(bot.queue.depth(k) for k in keys)
        busy = sum(1 for k in keys if bot.queue.depth(k))
        embed.add_field(
            name="Queue",
            value=f"{waiting} replies waiting or running in {busy} channels of this server",
            inline=False,
        )
        await interaction.followup.send(embed=limits.fit_embed(embed), ephemeral=True)
