"""The chat cogs: the listener that answers messages (`listener`), and the one that follows
members editing and deleting them (`changes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


async def setup(bot: RolecastBot) -> None:
    from bot.discord.cogs.chat.changes import MessageChanges
    from bot.discord.cogs.chat.listener import ChatListener

    listener = ChatListener(bot)
    await bot.add_cog(listener)
    await bot.add_cog(MessageChanges(bot, listener.intake))
