"""`/scene`: several personas in one channel.

Members look at the cast (`/scene list`) and hand the next turn to one of its members
(`/scene next`). Admins gather and change the cast (`/scene add|remove`), choose how it takes
turns (`/scene turns`: who answers a message addressed to nobody, and how many bot turns in a
row personas may answer one another) and give a member sampling of its own (`/scene sampling`).
Each admin command is checked when it runs and refused in direct messages; a cast only ever
holds personas the server sees (the shared ones and its own).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.memory import Turn
from bot.core.personas import Persona
from bot.core.scene import MAX_CHAIN_LIMIT, Scene
from bot.discord import limits
from bot.discord.bot import channel_key, send_ephemeral
from bot.discord.cogs.personas.commands import shown_name
from bot.discord.permissions import admin_only, guild_only
from bot.discord.webhooks import ReplyStream
from bot.errors import RolecastError
from bot.settings import describe_sampling, sampling_with

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)

MAX_CAST = 8  # personas in one channel's scene
ChatChannel = discord.TextChannel | discord.Thread | discord.VoiceChannel


def who(persona: Persona) -> str:
    return f"**{shown_name(persona.name)}** (`{persona.short_key}`)"


def describe(scene: Scene) -> str:
    """The cast and how it takes turns, for people."""
    if not scene.members:
        return "No persona here yet: an admin adds one with /scene add (or use /persona set)."
    if not scene.is_scene:
        return (
            f"{who(scene.members[0])} is this channel's one persona; an admin brings another "
            "in with /scene add."
        )
    cast = ", ".join(who(p) for p in scene.members)
    handed = scene.member(scene.next_persona)
    rule = (
        "the one whose name and card keywords it matches best"
        if scene.policy == "keywords"
        else "the next in turn"
    )
    lines = [
        f"Scene here: {cast}.",
        "A member answers when named or replied to; a message that addresses nobody by name "
        "(a mention of the bot, or any message in an `always` channel) gets one answer, "
        f"from {rule}.",
        f"Personas answer one another for up to {scene.chain_limit} bot turns in a row, then "
        "wait for a person; any message from a person stops them.",
    ]
    if handed is not None:
        lines.append(f"{who(handed)} has the next turn.")
    own = [p for p in scene.members if scene.sampling.get(p.key)]
    for persona in own:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(scene.sampling[persona.key].items()))
        lines.append(f"{who(persona)} samples with {settings}.")
    return "\n".join(lines)


class SceneCommands(commands.GroupCog, group_name="scene"):
    """Several personas in one channel: the cast, and how it takes turns."""

    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        super().__init__()

    async def persona_autocomplete(
        self, interaction: discord.Interaction[RolecastBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return self.bot.persona_choices(current, interaction.guild_id)

    async def member_autocomplete(
        self, interaction: discord.Interaction[RolecastBot], current: str
    ) -> list[app_commands.Choice[str]]:
        """The members of the channel's cast whose key or name contains what was typed."""
        if interaction.channel is None:
            return []
        needle = current.strip().lower()
        scene = await self.bot.scene(interaction)
        return [
            limits.choice(f"{limits.one_line(p.name, 60)} ({p.short_key})", p.short_key)
            for p in scene.members
            if not needle or needle in p.short_key or needle in p.name.lower()
        ][: limits.CHOICES]

    async def _member(self, interaction: discord.Interaction[RolecastBot], name: str) -> Persona:
        """The cast member `name` means (a key, a name), among what this server sees."""
        scene = await self.bot.scene(interaction)
        found = scene.named(name)
        if found is None:
            try:
                persona = self.bot.persona_for(interaction, name)
            except RolecastError:
                persona = None
            found = scene.member(persona.key) if persona is not None else None
        if found is None:
            known = ", ".join(p.short_key for p in scene.members) or "nobody yet"
            raise RolecastError(
                f"{limits.one_line(name, 80)!r} is not in this channel's scene (cast: {known})."
            )
        return found

    async def _greet(
        self, interaction: discord.Interaction[RolecastBot], persona: Persona, greeting: Turn
    ) -> None:
        """Post a new member's greeting through the webhook, under its name."""
        channel = interaction.channel
        if not isinstance(channel, ChatChannel):
            return
        stream = ReplyStream(channel, self.bot.webhooks, self.bot.identity(persona))
        ids = await stream.finish(greeting.content)
        await self.bot.memory.link_messages(greeting.id, ids)

    # -- members -------------------------------------------------------------------------------

    @app_commands.command(name="list", description="The personas of this channel's scene.")
    @guild_only
    async def list_cast(self, interaction: discord.Interaction[RolecastBot]) -> None:
        await interaction.response.defer(ephemeral=True)
        await send_ephemeral(interaction, describe(await self.bot.scene(interaction)))

    @app_commands.command(name="next", description="Hand the next turn to a persona of the scene.")
    @app_commands.describe(persona="A persona of this channel's scene")
    @guild_only
    async def next_turn(self, interaction: discord.Interaction[RolecastBot], persona: str) -> None:
        await interaction.response.defer(ephemeral=True)
        member = await self._member(interaction, persona)
        assert interaction.channel is not None
        await self.bot.memory.set_next_persona(channel_key(interaction.channel), member.key)
        await send_ephemeral(
            interaction,
            f"{who(member)} answers the next message here that addresses nobody by name.",
        )

    next_turn.autocomplete("persona")(member_autocomplete)

    # -- admins --------------------------------------------------------------------------------

    @app_commands.command(name="add", description="Bring a persona into this channel. Admins only.")
    @app_commands.describe(persona="The persona (start typing to search)")
    @app_commands.default_permissions(manage_guild=True)
    @admin_only
    async def add(self, interaction: discord.Interaction[RolecastBot], persona: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        assert interaction.channel is not None and interaction.guild_id is not None
        key = channel_key(interaction.channel)
        found = self.bot.persona_for(interaction, persona)  # only what this server sees
        # The cast is checked and changed in one step: of adds at the same time, each tells
        # what happened, and no more than MAX_CAST join.
        joined, greeting = await self.bot.chat.join(
            key, found.key, user_name=interaction.user.display_name, most=MAX_CAST
        )
        await self.bot.memory.set_channel_guild(key, str(interaction.guild_id))
        log.info("persona %s joined %s (by %s)", found.key, key, interaction.user.id)
        scene = await self.bot.scene(interaction)
        said = f"{who(found)} joined this channel." if joined else f"{who(found)} is here already."
        await send_ephemeral(interaction, f"{said}\n{describe(scene)}")
        if greeting is not None:
            await self._greet(interaction, found, greeting)

    add.autocomplete("persona")(persona_autocomplete)

    @app_commands.command(
        name="remove", description="Take a persona out of this channel. Admins only."
    )
    @app_commands.describe(persona="A persona of this channel's scene")
    @app_commands.default_permissions(manage_guild=True)
    @admin_only
    async def remove(self, interaction: discord.Interaction[RolecastBot], persona: str) -> None:
        await interaction.response.defer(ephemeral=True)
        assert interaction.channel is not None
        member = await self._member(interaction, persona)
        await self.bot.chat.leave(channel_key(interaction.channel), member.key)
        log.info("persona %s left %s (by %s)", member.key, interaction.channel, interaction.user.id)
        scene = await self.bot.scene(interaction)
        await send_ephemeral(
            interaction,
            f"{who(member)} left this channel; its turns stay in the history.\n{describe(scene)}",
        )

    remove.autocomplete("persona")(member_autocomplete)

    @app_commands.command(
        name="turns", description="How the scene's personas take turns. Admins only."
    )
    @app_commands.describe(
        policy="Who answers a message that addresses nobody by name",
        chain_limit="Bot turns in a row while personas answer one another (0 = they never do)",
    )
    @app_commands.default_permissions(manage_guild=True)
    @admin_only
    async def turns(
        self,
        interaction: discord.Interaction[RolecastBot],
        policy: Literal["round-robin", "keywords"] | None = None,
        chain_limit: app_commands.Range[int, 0, MAX_CHAIN_LIMIT] | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        assert interaction.channel is not None
        key = channel_key(interaction.channel)
        current = await self.bot.memory.channel_settings(key)
        await self.bot.memory.set_turn_policy(
            key,
            policy or current.policy,
            current.chain_limit if chain_limit is None else chain_limit,
        )
        await self.bot.memory.set_channel_guild(key, str(interaction.guild_id))
        await send_ephemeral(interaction, describe(await self.bot.scene(interaction)))

    @app_commands.command(
        name="sampling", description="Sampling of one persona of the scene. Admins only."
    )
    @app_commands.describe(
        persona="A persona of this channel's scene",
        temperature="0 = always the likeliest words; higher = more varied",
        top_p="nucleus sampling mass",
        max_tokens="reply length limit in tokens",
        repetition_penalty="1 = none",
        seed="fixed seed for reproducible replies",
        reset="back to the channel's sampling",
    )
    @app_commands.default_permissions(manage_guild=True)
    @admin_only
    async def sampling(
        self,
        interaction: discord.Interaction[RolecastBot],
        persona: str,
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
        member = await self._member(interaction, persona)
        scene = await self.bot.scene(interaction)
        if not scene.is_scene:
            raise RolecastError(
                "This channel has one persona: its sampling is the channel's (/channel sampling)."
            )
        overrides: dict[str, object] = {} if reset else dict(scene.sampling.get(member.key, {}))
        given = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
        }
        overrides.update({k: v for k, v in given.items() if v is not None})
        base = self.bot.sampling_for(await self.bot.memory.channel_settings(key))
        try:
            effective = sampling_with(base, overrides)
        except ValueError as exc:
            await send_ephemeral(interaction, f"Not changed: {exc}")
            return
        await self.bot.memory.set_cast_sampling(key, member.key, overrides or None)
        await send_ephemeral(
            interaction, f"{who(member)} samples here with {describe_sampling(effective)}."
        )

    sampling.autocomplete("persona")(member_autocomplete)
