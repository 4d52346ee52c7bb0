"""The admin cog."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


async def setup(bot: RolecastBot) -> None:
    from bot.discord.cogs.admin.commands import AdminCommands

    await bot.add_cog(AdminCommands(bot))
