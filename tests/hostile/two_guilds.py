"""A bot in two Discord servers at once, on dpytest's gateway and the strict fake Discord: one
real bot, one SQLite file, one personas folder and adapter registry, two guilds that must not
see or touch each other's personas, dialogues, jobs and adapters. Commands are real
interaction payloads, from a guild's admin, a plain member, or a direct message."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext.test import factories as facts

from bot.core.client import ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.discord.bot import RolecastBot, channel_key
from tests.discord.conftest import ADMIN, BOT_PERMISSIONS, bot_settings
from tests.discord.fakediscord import invoke, slash_data, snowflake
from tests.hostile.conftest import QUICK_CLIENT
from tests.hostile.strict_discord import StrictDiscordAPI


@dataclass
class Side:
    """One of the two servers: its channel, an admin (Manage Server) and a plain member."""

    guild: discord.Guild
    channel: discord.TextChannel
    admin: discord.Member
    member: discord.Member

    @property
    def id(self) -> str:
        return str(self.guild.id)

    @property
    def key(self) -> str:
        return channel_key(self.channel)


@dataclass
class TwoGuilds:
    bot: RolecastBot
    api: StrictDiscordAPI
    memory: Memory
    home: Path
    a: Side
    b: Side

    async def command(
        self,
        side: Side,
        path: str,
        options: dict[str, Any] | None = None,
        *,
        as_admin: bool = True,
        member: discord.Member | None = None,
        resolved: dict[str, Any] | None = None,
        focused: str | None = None,
    ) -> str:
        """Run a slash command in `side`'s channel (by its admin, or its plain member) and
        return the last thing the bot answered."""
        data = slash_data(self.bot.tree, path, options, resolved=resolved, focused=focused)
        who = member or (side.admin if as_admin else side.member)
        permissions = ADMIN if as_admin and member is None else None
        before = len(self.api.responses)
        await invoke(self.bot, side.channel, who, data, permissions=permissions)
        return self.answer(before)

    async def direct(
        self,
        user: discord.abc.User,
        path: str,
        options: dict[str, Any] | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> str:
        """Run a slash command in a direct message with the bot."""
        data = slash_data(self.bot.tree, path, options, resolved=resolved)
        before = len(self.api.responses)
        dm = str(snowflake())
        payload = {
            "id": str(snowflake()),
            "application_id": str(self.bot.application_id),
            "type": 2,
            "token": f"interaction-token-{snowflake()}",
            "version": 1,
            "channel_id": dm,
            "channel": {"id": dm, "type": 1, "recipients": [facts.dict_from_user(user)]},
            "user": facts.dict_from_user(user),
            "app_permissions": str(discord.Permissions.all().value),
            "locale": "en-US",
            "context": 1,
            "attachment_size_limit": 26_214_400,
            "data": data,
        }
        interaction = discord.Interaction(data=payload, state=self.bot._connection)  # type: ignore[arg-type]
        await self.bot.tree._call(interaction)
        return self.answer(before)

    def answer(self, since: int) -> str:
        texts = []
        for response in self.api.responses[since:]:
            if response.content:
                texts.append(response.content)
            texts += [json.dumps(e, ensure_ascii=False) for e in response.embeds]
        return "\n".join(texts)

    def files(self) -> dict[str, bytes]:
        """The files of the last answer that had any."""
        return next(r.files for r in reversed(self.api.responses) if r.files)

    async def state(self) -> tuple[object, ...]:
        """Everything a command could change: the database's rows, the personas, adapter
        registry and retrain folders, the personas the bot knows."""
        tables = {}
        for table in ("channels", "cast_members", "guilds", "dialogues", "retrain_jobs", "turns"):
            rows = await self.memory.db.execute_fetchall(f"SELECT * FROM {table} ORDER BY 1")
            tables[table] = [tuple(r) for r in rows]
        files = sorted(
            (str(p.relative_to(self.home)), p.read_bytes())
            for folder in ("personas", "adapters", "retrain")
            for p in (self.home / folder).rglob("*")
            if p.is_file()
        )
        return tables, files, self.bot.personas.keys()


async def two_guilds(
    tmp_path: Path, server_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TwoGuilds]:
    settings = bot_settings(tmp_path, server_url)
    personas = PersonaRegistry(settings.user_personas).load()
    async with (
        Memory.open(settings.database) as memory,
        ModelClient(server_url, max_attempts=1, max_backoff_s=0.1, **QUICK_CLIENT) as client,  # type: ignore[arg-type]
    ):
        bot = RolecastBot(
            memory=memory,
            client=client,
            personas=personas,
            settings=settings,
            intents=discord.Intents.all(),
        )
        await bot._async_setup_hook()
        dpytest.configure(bot, guilds=2, voice_channels=0, members=["admin", "member"])
        assert bot.user is not None
        bot._connection.application_id = bot.user.id
        await bot.setup_hook()
        api = StrictDiscordAPI(bot)
        api.install(monkeypatch)
        config = dpytest.get_config()
        sides = []
        for index, guild in enumerate(config.guilds):
            role = dpytest.backend.make_role("Rolecast", guild, permissions=BOT_PERMISSIONS.value)
            assert guild.me is not None
            await dpytest.add_role(guild.me, role)
            channel = config.channels[index]
            assert isinstance(channel, discord.TextChannel) and channel.guild == guild
            admin, member = config.members[2 * index : 2 * index + 2]
            sides.append(Side(guild, channel, admin, member))
        try:
            yield TwoGuilds(bot, api, memory, tmp_path, sides[0], sides[1])
        finally:
            await dpytest.empty_queue()
            for name in list(bot.extensions):
                await bot.unload_extension(name)
