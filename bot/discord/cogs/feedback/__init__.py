"""The feedback cog."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


async def setup(bot: RolecastBot) -> None:
    from bot.discord.cogs.feedback.feedback import Feedback

    await bot.add_cog(Feedback(bot))
