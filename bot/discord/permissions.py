"""Admin checks for slash commands, made at run time.

Discord's default member permissions on a command are only a default that a server can
override, so every admin command also checks, when it runs, that the caller has Manage Server
(or Administrator) or the admin role an admin set for the guild with `/admin role`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.discord.bot import RolecastBot


class NotAdmin(app_commands.CheckFailure):
    def __init__(self) -> None:
        super().__init__(
            "This command is for admins: you need the Manage Server permission or this "
            "server's Rolecast admin role."
        )


class GuildOnly(app_commands.CheckFailure):
    def __init__(self) -> None:
        super().__init__("This command works in a server channel, not in direct messages.")


def has_manage_server(interaction: discord.Interaction[Any]) -> bool:
    perms = interaction.permissions
    return perms.manage_guild or perms.administrator


async def is_admin(interaction: discord.Interaction[RolecastBot]) -> bool:
    if interaction.guild_id is None:
        return False
    if has_manage_server(interaction):
        return True
    role_id = await interaction.client.memory.admin_role(str(interaction.guild_id))
    user = interaction.user
    if role_id is None or not isinstance(user, discord.Member):
        return False
    return any(str(role.id) == role_id for role in user.roles)


async def _admin_predicate(interaction: discord.Interaction[RolecastBot]) -> bool:
    if interaction.guild_id is None:
        raise GuildOnly()
    if not await is_admin(interaction):
        raise NotAdmin()
    return True


async def _manage_server_predicate(interaction: discord.Interaction[RolecastBot]) -> bool:
    if interaction.guild_id is None:
        raise GuildOnly()
    if not has_manage_server(interaction):
        raise app_commands.CheckFailure("This needs the Manage Server permission.")
    return True


async def _guild_predicate(interaction: discord.Interaction[RolecastBot]) -> bool:
    if interaction.guild_id is None:
        raise GuildOnly()
    return True


admin_only = app_commands.check(_admin_predicate)
manage_server_only = app_commands.check(_manage_server_predicate)
guild_only = app_commands.check(_guild_predicate)
