"""Admin commands: channel behaviour, the guild's admin role, and the training export.
Every one is checked at run time (`bot.discord.permissions`)."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.export import Names, export_dialogues
from bot.discord import limits
from bot.discord.bot import channel_key, send_ephemeral
from bot.discord.permissions import admin_only, manage_server_only
from bot.settings import describe_sampling, sampling_with

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)


def _names(guild: discord.Guild, author_names: dict[str, str]) -> Names:
    users = dict(author_names)
    users.update({str(m.id): m.display_name for m in guild.members})
    return Names(
        users=users,
        roles={str(r.id): r.name for r in guild.roles},
        channels={str(c.id): c.name for c in guild.channels},
    )


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class ChannelGroup(
    app_commands.Group, name="channel", description="How this channel's persona behaves."
):
    def __init__(self, bot: RolecastBot) -> None:
        super().__init__()
        self.bot = bot

    @app_commands.command(name="mode", description="Answer only when mentioned, or every message.")
    @admin_only
    async def mode(
        self,
        interaction: discord.Interaction[RolecastBot],
        mode: Literal["mention", "always"],
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        assert interaction.channel is not None
        key = channel_key(interaction.channel)
        await self.bot.memory.set_channel_mode(key, mode)
        await self.bot.memory.set_channel_guild(key, str(interaction.guild_id))
        explain = (
            "answers every message (a burst from one person gets one answer)"
            if mode == "always"
            else "answers when mentioned or replied to"
        )
        await send_ephemeral(interaction, f"This channel's persona now {explain}.")

    @app_commands.command(name="sampling", description="Sampling for this channel's replies.")
    @app_commands.describe(
        temperature="0 = always the likeliest words; higher = more varied",
        top_p="nucleus sampling mass",
        max_tokens="reply length limit in tokens",
        repetition_penalty="1 = none",
        seed="fixed seed for reproducible replies",
        reset="back to the bot's defaults",
    )
    @admin_only
    async def sampling(
        self,
        interaction: discord.Interaction[RolecastBot],
        temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
        top_p: app_commands.Range[float, 0.01, 1.0] | None = None,
        max_tokens: app_commands.Range[int, 1, 8192] | None = None,
        repetition_penalty: app_commands.Range[float, 0.5, 2.0] | None = None,
        seed: int | None = None,
        reset: bool = False,
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        assert interaction.channel is not None
        key = channel_key(interaction.channel)
        memory = self.bot.memory
        current = await memory.channel_settings(key)
        overrides: dict[str, object] = {} if reset else dict(current.sampling or {})
        given = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
        }
        overrides.update({k: v for k, v in given.items() if v is not None})
        try:
            effective = sampling_with(self.bot.settings.sampling, overrides)
        except ValueError as exc:
            await send_ephemeral(interaction, f"Not changed: {exc}")
            return
        await memory.set_channel_sampling(key, overrides or None)
        await send_ephemeral(interaction, f"Sampling here: {describe_sampling(effective)}.")


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class AdminGroup(app_commands.Group, name="admin", description="Who may use the admin commands."):
    def __init__(self, bot: RolecastBot) -> None:
        super().__init__()
        self.bot = bot

    @app_commands.command(name="role", description="Members with this role may use admin commands.")
    @app_commands.describe(role="The role; leave out to clear it")
    @manage_server_only
    async def role(
        self, interaction: discord.Interaction[RolecastBot], role: discord.Role | None = None
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        assert interaction.guild_id is not None
        await self.bot.memory.set_admin_role(
            str(interaction.guild_id), str(role.id) if role else None
        )
        if role is None:
            await send_ephemeral(interaction, "Admin role cleared: only Manage Server counts now.")
        else:
            await send_ephemeral(interaction, f"Members with @{role.name} may use admin commands.")


class AdminCommands(commands.Cog):
    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        self.channel_group = ChannelGroup(bot)
        self.admin_group = AdminGroup(bot)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.channel_group)
        self.bot.tree.add_command(self.admin_group)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.channel_group.name)
        self.bot.tree.remove_command(self.admin_group.name)

    @app_commands.command(
        name="export",
        description="A persona's approved dialogues as ShareGPT JSONL + dataset_info.json.",
    )
    @app_commands.describe(persona="The persona")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admin_only
    async def export(self, interaction: discord.Interaction[RolecastBot], persona: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        guild = interaction.guild
        assert guild is not None
        found = self.bot.persona_for(interaction, persona)
        dialogues = await self.bot.memory.dialogues(found.key, guild_id=str(guild.id))
        authors = {
            str(m["author_id"]): str(m["author_name"])
            for d in dialogues
            for m in d.messages
            if m.get("author_id") and m.get("author_name")
        }
        result = export_dialogues(found.short_key, found.card, dialogues, _names(guild, authors))
        if not result.records:
            await send_ephemeral(
                interaction,
                f"{found.name} has no approved dialogues in this server yet: approve replies "
                "with 👍 or the “Approve for training” message command.",
            )
            return
        size = len(result.jsonl) + len(result.dataset_info)
        if size > guild.filesize_limit:
            await send_ephemeral(
                interaction,
                f"The export of {found.name} is {size / 2**20:.1f} MiB, more than this server's "
                f"upload limit of {guild.filesize_limit / 2**20:.0f} MiB. /retrain trains on the same "
                "dialogues without a download.",
            )
            return
        log.info(
            "export of %s: %d dialogues for %s", found.key, result.records, interaction.user.id
        )
        files = [
            discord.File(io.BytesIO(result.jsonl), filename=result.file_name),
            discord.File(io.BytesIO(result.dataset_info), filename="dataset_info.json"),
        ]
        skipped = (
            f" ({result.skipped} left out: without a user turn, or unreadable)"
            if result.skipped
            else ""
        )
        shown = discord.utils.escape_markdown(limits.one_line(found.name, 100))
        await interaction.followup.send(
            f"{result.records} approved dialogues of **{shown}**{skipped}, in LLaMA-Factory's "
            "ShareGPT format.",
            files=files,
            ephemeral=True,
        )

    @export.autocomplete("persona")
    async def export_autocomplete(
        self, interaction: discord.Interaction[RolecastBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return self.bot.persona_choices(current, interaction.guild_id)
