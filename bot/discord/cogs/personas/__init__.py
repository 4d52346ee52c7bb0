"""The personas cog."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


async def setup(bot: RolecastBot) -> None:
    from bot.discord.cogs.personas.commands import PersonaCommands

    await bot.add_cog(PersonaCommands(bot))
