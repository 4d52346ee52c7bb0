"""The retrain cog: /retrain, /adapters, /rollback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


async def setup(bot: RolecastBot) -> None:
    from bot.discord.cogs.retrain.commands import RetrainCommands

    await bot.add_cog(RetrainCommands(bot))
