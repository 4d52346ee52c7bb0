"""Fixtures for the Discord adapter: a real bot with real SQLite and a real model server over
loopback HTTP, on dpytest's fake gateway, with Discord's webhook/interaction endpoints answered
by `FakeDiscordAPI`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest

from bot.core.client import ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.discord.bot import RolecastBot, channel_key
from bot.settings import BotSettings
from tests.discord.fakediscord import FakeDiscordAPI, invoke, slash_data
from tests.instant_server import InstantServer, ServerState

BOT_PERMISSIONS = discord.Permissions(104324161) | discord.Permissions(manage_webhooks=True)
ADMIN = discord.Permissions(manage_guild=True)


@pytest.fixture(scope="module")
def instant() -> Iterator[InstantServer]:
    """The instant OpenAI-compatible server on a loopback port (module-wide)."""
    with InstantServer(ServerState(max_model_len=2048)) as server:
        yield server


@pytest.fixture
def server_state(instant: InstantServer) -> Iterator[ServerState]:
    """The instant server's behaviour, reset after each test."""
    state = instant.state
    yield state
    fresh = ServerState(max_model_len=2048)
    for name in ("adapters", "reply", "token_delay_s", "fail_status", "max_model_len"):
        setattr(state, name, getattr(fresh, name))
    state.requests.clear()


def bot_settings(home: Path, server_url: str, **discord_overrides: Any) -> BotSettings:
    discord_settings = {
        "cooldown_s": 0.0,
        "burst_window_s": 0.3,
        "edit_interval_s": 0.2,
        "sync_commands": False,
        # a deletion is done at once (tests/discord/test_proxies.py plays the window through)
        "proxy_window_s": 0.0,
        **discord_overrides,
    }
    return BotSettings(
        home=home,
        server_url=server_url,
        retry_attempts=1,
        retry_max_wait_s=0.1,
        request_timeout_s=30,
        discord=discord_settings,  # type: ignore[arg-type]
    )


@dataclass
class Rig:
    bot: RolecastBot
    api: FakeDiscordAPI
    memory: Memory
    guild: discord.Guild
    channel: discord.TextChannel
    alice: discord.Member
    bob: discord.Member
    home: Path

    @property
    def key(self) -> str:
        return channel_key(self.channel)

    async def command(
        self,
        path: str,
        options: dict[str, Any] | None = None,
        *,
        member: discord.Member | None = None,
        permissions: discord.Permissions | None = None,
        resolved: dict[str, Any] | None = None,
    ) -> discord.Interaction[Any]:
        data = slash_data(self.bot.tree, path, options, resolved=resolved)
        return await invoke(
            self.bot, self.channel, member or self.alice, data, permissions=permissions
        )

    async def say(self, text: str, member: discord.Member | None = None) -> discord.Message:
        return await dpytest.message(text, self.channel, member or self.alice)

    def mention(self) -> str:
        assert self.bot.user is not None
        return f"<@{self.bot.user.id}>"

    def replies(self) -> list[str]:
        """Persona replies (webhook posts) in the channel, final text, oldest first."""
        return [p.content for p in self.api.posts_in(self.channel.id)]

    def last_response(self) -> str:
        texts = self.api.texts()
        assert texts, "the command answered nothing"
        return texts[-1]


async def make_rig(
    tmp_path: Path, server_url: str, monkeypatch: pytest.MonkeyPatch, **discord_overrides: Any
) -> AsyncIterator[Rig]:
    settings = bot_settings(tmp_path, server_url, **discord_overrides)
    personas = PersonaRegistry(settings.user_personas).load()
    async with (
        Memory.open(settings.database) as memory,
        ModelClient(server_url, max_attempts=1, max_backoff_s=0.1) as client,
    ):
        bot = RolecastBot(
            memory=memory,
            client=client,
            personas=personas,
            settings=settings,
            intents=discord.Intents.all(),
        )
        await bot._async_setup_hook()
        dpytest.configure(bot, members=["alice", "bob"])
        assert bot.user is not None
        bot._connection.application_id = bot.user.id
        await bot.setup_hook()
        api = FakeDiscordAPI(bot)
        api.install(monkeypatch)
        config = dpytest.get_config()
        guild = config.guilds[0]
        role = dpytest.backend.make_role("Rolecast", guild, permissions=BOT_PERMISSIONS.value)
        assert guild.me is not None
        await dpytest.add_role(guild.me, role)
        channel = config.channels[0]
        assert isinstance(channel, discord.TextChannel)
        alice, bob = config.members
        try:
            yield Rig(bot, api, memory, guild, channel, alice, bob, tmp_path)
        finally:
            await dpytest.empty_queue()
            for name in list(bot.extensions):
                await bot.unload_extension(name)


@pytest.fixture
async def rig(
    tmp_path: Path,
    instant: InstantServer,
    server_state: ServerState,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Rig]:
    async for r in make_rig(tmp_path, instant.base_url, monkeypatch):
        yield r


def read_jsonl(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
