"""The scene cog: several personas in one channel."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


async def setup(bot: RolecastBot) -> None:
    from bot.discord.cogs.scene.commands import SceneCommands

    await bot.add_cog(SceneCommands(bot))
