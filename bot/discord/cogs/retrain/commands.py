"""`/retrain`, `/adapters`, `/rollback`: the retrain loop from Discord.

A retrain posts a status message in the channel and edits it as the job goes (state, step,
loss, tokens/s, time left; at most every `retrain.status_interval_s`), then attaches the loss
curve and the eval chart. It is a channel message, not the interaction's response, because an
interaction token expires after 15 minutes and a job may run longer or outlive a restart: the
job row keeps the channel and message ids, and a restarted bot edits the same message.

What one server does here never changes what another hears: a server retrains and rolls back
only the personas it imported (`bot.core.personas`), on its own approved dialogues. The shared
personas (shipped, or imported by the operator) speak the same in every server, so their
adapters are the operator's to retrain and roll back (`rolecast retrain`, `rolecast adapters
rollback`); a server may look at their versions with `/adapters`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.export import Names
from bot.core.memory import Dialogue
from bot.core.personas import Persona
from bot.discord import limits
from bot.discord.bot import send_ephemeral
from bot.discord.permissions import admin_only
from bot.errors import RolecastError
from bot.retrain.jobs import Job, JobActive
from bot.retrain.progress import format_duration
from bot.retrain.runner import RetrainService, author_names

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)

COLOURS = {"done": discord.Colour.green(), "rejected": discord.Colour.orange()}


def status_embed(job: Job, persona_name: str) -> discord.Embed:
    embed = discord.Embed(
        title=f"Retrain {persona_name} · job #{job.id}",
        colour=COLOURS.get(job.state, discord.Colour.red() if job.state == "failed" else None),
    )
    embed.add_field(name="State", value=job.state)
    if job.dialogues:
        embed.add_field(name="Dialogues", value=str(job.dialogues))
    if job.step is not None:
        total = f" / {job.total_steps}" if job.total_steps else ""
        embed.add_field(name="Step", value=f"{job.step}{total}")
        if job.loss is not None:
            embed.add_field(name="Loss", value=f"{job.loss:.4f}")
        if job.tokens_per_s:
            embed.add_field(name="Tokens/s", value=f"{job.tokens_per_s:,.0f}")
        if job.eta_s is not None and job.state == "training":
            embed.add_field(name="Time left", value=format_duration(job.eta_s))
    if job.metrics and job.metrics.get("scores"):
        scores = job.metrics["scores"]
        lines = [
            f"{name}: BLEU-4 {s['bleu-4']:.2f} · ROUGE-L {s['rouge-l']:.2f}"
            for name, s in scores.items()
        ]
        embed.add_field(name="Gate", value="\n".join(lines)[:1024], inline=False)
    if job.reason and job.terminal:
        embed.description = job.reason[:4000]
    return embed


def guild_names(guild: discord.Guild | None, dialogues: Sequence[Dialogue]) -> Names:
    known = author_names(dialogues)
    if guild is None:
        return known
    users = {**known.users, **{str(m.id): m.display_name for m in guild.members}}
    return Names(
        users=users,
        roles={str(r.id): r.name for r in guild.roles},
        channels={str(c.id): c.name for c in guild.channels},
    )


def owned(persona: Persona, what: str) -> Persona:
    """`persona`, when the calling server owns it; else why it cannot `what` it."""
    if persona.shared:
        shown = discord.utils.escape_markdown(limits.one_line(persona.name, 100))
        raise RolecastError(
            f"**{shown}** (`{persona.short_key}`) is shared by every server this bot is in, so "
            f"a server cannot {what} it: that would change what the other servers hear. The "
            f"bot's operator does (`rolecast retrain --persona {persona.key}`, `rolecast "
            "adapters rollback`). Import a card of your own (/persona import) to train a "
            "persona of this server."
        )
    return persona


class RetrainCommands(commands.Cog):
    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        self.service = RetrainService(
            bot.memory,
            bot.personas,
            bot.settings,
            server_url=bot.client.root_url,
            listener=self.on_job,
            names_for=self.names_for,
        )
        self.edited_at: dict[int, tuple[float, str]] = {}  # job id -> (when, state shown)
        self.messages: dict[int, discord.Message] = {}  # job id -> its status message
        self._resume: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        self._resume = asyncio.create_task(self.resume_when_ready())

    async def cog_unload(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resume
        await self.service.aclose()  # training processes keep running; the next start follows

    async def resume_when_ready(self) -> None:
        await self.bot.wait_until_ready()
        await self.service.resume_jobs()

    def names_for(self, job: Job, dialogues: Sequence[Dialogue]) -> Names:
        guild = self.bot.get_guild(int(job.guild_id)) if job.guild_id else None
        return guild_names(guild, dialogues)

    async def on_job(self, job: Job) -> None:
        """Edit the job's status message: always on a new state, else at most every few s."""
        if job.channel_id is None or job.message_id is None:
            return
        now = time.monotonic()
        last_at, last_state = self.edited_at.get(job.id, (0.0, ""))
        interval = self.bot.settings.retrain.status_interval_s
        if job.state == last_state and now - last_at < interval:
            return
        self.edited_at[job.id] = (now, job.state)
        name = (
            self.bot.personas.get(job.persona).name
            if job.persona in self.bot.personas
            else job.persona
        )
        files = []
        if job.terminal:
            self.edited_at.pop(job.id, None)
            paths = self.service.paths(job)
            files = [
                discord.File(path, filename=f"{job.persona}-{job.id}-{label}.png")
                for path, label in ((paths.loss_png, "loss"), (paths.eval_png, "eval"))
                if path.is_file()
            ]
        message = self.messages.get(job.id)
        if message is None:  # after a restart: the job row knows where its message is
            channel = self.bot.get_channel(int(job.channel_id))
            if channel is None:
                channel = await self.bot.fetch_channel(int(job.channel_id))
            assert isinstance(channel, discord.abc.Messageable)
            message = self.messages[job.id] = await channel.fetch_message(int(job.message_id))
        if job.terminal:
            self.messages.pop(job.id, None)
        await message.edit(
            content=None, embed=limits.fit_embed(status_embed(job, name)), attachments=files
        )

    @app_commands.command(name="retrain", description="Train a persona on its approved dialogues.")
    @app_commands.describe(
        persona="The persona", min_approved="Approved dialogues needed (default from settings)"
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admin_only
    async def retrain(
        self,
        interaction: discord.Interaction[RolecastBot],
        persona: str,
        min_approved: app_commands.Range[int, 2, 100_000] | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        found = owned(self.bot.persona_for(interaction, persona), "retrain")
        active = await self.service.store.active(found.key)
        if active is not None:
            await send_ephemeral(interaction, str(JobActive(active)) + ".")
            return
        channel = interaction.channel
        assert isinstance(channel, discord.abc.Messageable)
        shown = discord.utils.escape_markdown(limits.one_line(found.name, 100))
        status = await channel.send(
            f"Retrain of **{shown}** requested by {interaction.user.mention}…"
        )
        try:
            job = await self.service.start(
                found.key,
                requested_by=str(interaction.user.id),
                min_approved=min_approved,
                guild_id=str(interaction.guild_id),
                channel_id=str(status.channel.id),
                message_id=str(status.id),
            )
        except JobActive as exc:
            await status.delete()
            await send_ephemeral(interaction, f"{exc}.")
            return
        self.messages[job.id] = status
        log.info("retrain job #%d for %s requested by %s", job.id, job.persona, interaction.user.id)
        await send_ephemeral(
            interaction, f"Started job #{job.id} for {found.name}; progress: {status.jump_url}"
        )

    @app_commands.command(
        name="adapters", description="A persona's adapter versions and which is live."
    )
    @app_commands.describe(persona="The persona")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admin_only
    async def adapters(self, interaction: discord.Interaction[RolecastBot], persona: str) -> None:
        await interaction.response.defer(ephemeral=True)
        found = self.bot.persona_for(interaction, persona)
        versions, live = self.service.versions(found.key)
        if not versions:
            await send_ephemeral(
                interaction, f"{found.name} has no adapter yet: it speaks through the base model."
            )
            return
        lines = []
        for v in reversed(versions):
            metrics = v.manifest.metrics
            shown = " · ".join(
                f"{k} {metrics[k]:.2f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                for k in ("bleu-4", "rouge-l", "final_train_loss")
                if k in metrics
            )
            mark = "**live** " if v.served_name == live else ""
            created = (v.manifest.created or "")[:16]
            lines.append(f"{mark}`{v.served_name}` {created} {shown}".rstrip())
        await send_ephemeral(interaction, f"Adapters of {found.name}:\n" + "\n".join(lines))

    @app_commands.command(name="rollback", description="Return a persona to its previous adapter.")
    @app_commands.describe(persona="The persona")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admin_only
    async def rollback(self, interaction: discord.Interaction[RolecastBot], persona: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        found = owned(self.bot.persona_for(interaction, persona), "roll back")
        answer = await self.service.rollback(found.key)
        log.warning("%s rolled back by %s: %s", found.key, interaction.user.id, answer)
        await send_ephemeral(interaction, answer)

    @retrain.autocomplete("persona")
    @adapters.autocomplete("persona")
    @rollback.autocomplete("persona")
    async def persona_autocomplete(
        self, interaction: discord.Interaction[RolecastBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return self.bot.persona_choices(current, interaction.guild_id)
