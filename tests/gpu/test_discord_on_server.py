"""The Discord chat flow against a running model server on a GPU host (vLLM, started through
`rolecast serve --engine vllm`): a mention streams a reply from the server through the persona's
adapter, posted under the persona's name, with the server's /tokenize counts kept.

    ROLECAST_GPU_SERVER_URL=http://127.0.0.1:8000 python -m pytest -m gpu tests/gpu

CI never runs it (the `gpu` marker is deselected by default, and without the variable it skips).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from formats.basemodel import SHIPPED_NAME
from formats.registry import parse_served_name
from tests.discord.conftest import Rig, make_rig

pytestmark = pytest.mark.gpu
URL = os.environ.get("ROLECAST_GPU_SERVER_URL", "").rstrip("/").removesuffix("/v1")


@pytest.fixture
async def real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    if not URL:
        pytest.skip("ROLECAST_GPU_SERVER_URL names no running server")
    async for rig in make_rig(tmp_path, f"{URL}/v1", monkeypatch):
        yield rig


def expected(persona: str) -> str:
    """The bot without a registry speaks through the persona's newest loaded version, else the
    shipped adapter, else the base model."""
    cards = httpx.get(f"{URL}/v1/models", timeout=30).json()["data"]
    versions = [
        (parsed[1], c["id"])
        for c in cards
        if (parsed := parse_served_name(c["id"])) and parsed[0] == persona
    ]
    if versions:
        return max(versions)[1]
    if any(c["id"] == SHIPPED_NAME for c in cards):
        return SHIPPED_NAME
    return next(c["id"] for c in cards if not c.get("parent"))


async def test_a_mention_is_answered_from_the_server_through_the_personas_adapter(
    real: Rig,
) -> None:
    rig = real
    want = expected("haruhi")
    await rig.command("persona set", {"name": "haruhi"})
    await rig.memory.set_channel_sampling(rig.key, {"max_tokens": 64, "seed": 0})
    await rig.say(f"{rig.mention()} 「春日，今天SOS团有什么活动？」")
    posts = rig.api.posts_in(rig.channel.id)
    assert posts[-1].username == "凉宫春日" and posts[-1].content.strip()
    turns = list(reversed(await rig.memory.recent_turns(rig.key, "haruhi", limit=10)))
    assert turns[-1].role == "assistant" and turns[-1].model == want
    assert all(t.token_count and t.token_count > 0 for t in turns[-2:-1])  # from /tokenize
