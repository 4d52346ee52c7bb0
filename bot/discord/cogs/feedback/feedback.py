"""Feedback that feeds training: the "Approve for training" message command and 👍/👎
reactions on persona replies (see `bot.core.approvals`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.bot import send_ephemeral

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot

log = logging.getLogger(__name__)

RATINGS: dict[str, Literal[-1, 1]] = {"👍": 1, "👎": -1}


class Feedback(commands.Cog):
    def __init__(self, bot: RolecastBot) -> None:
        self.bot = bot
        self.approve_menu = app_commands.ContextMenu(
            name="Approve for training", callback=self.approve
        )
        self.approve_menu.guild_only = True

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.approve_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.approve_menu.name, type=self.approve_menu.type)

    async def approve(
        self, interaction: discord.Interaction[RolecastBot], message: discord.Message
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        turn = await self.bot.memory.turn_by_message(str(message.id))
        guild = str(interaction.guild_id)
        if turn is not None:
            where = (await self.bot.memory.channel_settings(turn.channel_id)).guild_id
            if where is not None and where != guild:
                turn = None  # another server's reply: not this server's to approve
        if turn is None or turn.role != "assistant":
            await send_ephemeral(
                interaction, "That message is not a persona reply that Rolecast remembers."
            )
            return
        # (An interrupted reply is refused with a RolecastError: the tree says why.)
        dialogue, new = await self.bot.approvals.approve(
            turn, by=str(interaction.user.id), guild_id=guild
        )
        total = await self.bot.memory.count_dialogues(turn.persona, guild_id=guild)
        persona = self.bot.chat.persona_by_key(turn.persona)
        shown = persona.short_key if persona is not None else turn.persona
        if new:
            text = (
                f"Approved for training: this reply and the {len(dialogue.messages) - 1} turns "
                f"before it. {shown} now has {total} approved dialogues in this server."
            )
        else:
            text = f"Already approved. {shown} has {total} approved dialogues in this server."
        await send_ephemeral(interaction, text)

    async def _rating(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        rating = RATINGS.get(str(payload.emoji))
        if rating is None or payload.guild_id is None:
            return
        if self.bot.user is not None and payload.user_id == self.bot.user.id:
            return
        if payload.member is not None and payload.member.bot:
            return
        turn = await self.bot.memory.turn_by_message(str(payload.message_id))
        if turn is None or turn.role != "assistant":
            return
        if not turn.complete and turn.finish_reason != "length":
            return  # an interrupted reply is not rated (ratings approve replies)
        dialogue = await self.bot.approvals.react(
            turn, str(payload.user_id), rating, added=added, guild_id=str(payload.guild_id)
        )
        log.debug(
            "rating %+d on turn %d by %s (%s); dialogue: %s",
            rating,
            turn.id,
            payload.user_id,
            "added" if added else "removed",
            dialogue.id if dialogue else None,
        )

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self._rating(payload, added=True)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self._rating(payload, added=False)
