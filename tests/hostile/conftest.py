"""Fixtures for the hostile-input tests: the misbehaving model server, and a Discord rig whose
fake Discord refuses what the real one refuses and whose model client gives up quickly."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import tests.discord.conftest as discord_rig
from bot.core.client import ModelClient
from tests.discord.conftest import Rig
from tests.hostile.misbehaving_server import MisbehavingServer
from tests.hostile.strict_discord import StrictDiscordAPI

# The client's patience in these tests: a read may wait 1 s, a reply may take 3 s.
QUICK_CLIENT = {"timeout_s": 1.0, "reply_timeout_s": 3.0}


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[MisbehavingServer]:
    with MisbehavingServer() as server:
        yield server


@pytest.fixture
def server(misbehaving: MisbehavingServer) -> Iterator[MisbehavingServer]:
    """The misbehaving server, well-behaved until the test says otherwise."""
    misbehaving.reset()
    yield misbehaving
    misbehaving.reset()


async def strict_rig(
    tmp_path: Path, server_url: str, monkeypatch: pytest.MonkeyPatch, **discord_overrides: object
) -> AsyncIterator[Rig]:
    """The Discord test rig with a strict Discord and a quick model client."""
    monkeypatch.setattr(discord_rig, "FakeDiscordAPI", StrictDiscordAPI)
    monkeypatch.setattr(discord_rig, "ModelClient", functools.partial(ModelClient, **QUICK_CLIENT))
    async for rig in discord_rig.make_rig(tmp_path, server_url, monkeypatch, **discord_overrides):
        yield rig


@pytest.fixture
async def rig(
    tmp_path: Path, server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    async for r in strict_rig(tmp_path, server.base_url, monkeypatch):
        yield r
