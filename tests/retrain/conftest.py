"""Fixtures for the retrain loop: real SQLite, approved dialogues, a real embedded server on
the tiny model with an adapter registry, and settings that train for a few steps."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.core.approvals import Approvals
from bot.core.memory import Memory
from bot.core.sidecar import EmbeddedServer
from bot.settings import BotSettings

# Few steps, short dialogues, small batches: a training run takes seconds on a CPU.
TRAIN_ARGS = [
    "--max_steps", "12", "--save_steps", "2", "--max_length", "1024", "--batch_tokens", "1024",
    "--lora_r", "8", "--learning_rate", "1e-3",
]  # fmt: skip


def shared_dialogues(data_dir: Path, n: int, persona: str = "haruhi") -> list[tuple[str, str]]:
    """(user line, reply) pairs from a persona's shared dialogues, as members would write."""
    pairs = []
    for line in (data_dir / f"{persona}.jsonl").read_text(encoding="utf-8").splitlines():
        turns = json.loads(line)["conversations"]
        human = next((t["value"] for t in turns if t["from"] == "human"), None)
        gpt = next((t["value"] for t in turns if t["from"] == "gpt"), None)
        if human and gpt and len(human) + len(gpt) < 200:
            pairs.append((human, gpt))
        if len(pairs) == n:
            break
    return pairs


async def approve(
    memory: Memory,
    pairs: list[tuple[str, str]],
    *,
    guild: str = "g1",
    channel: str = "c1",
    persona: str = "haruhi",
) -> None:
    """Members chat with a persona in a test channel and an admin approves each reply."""
    key = f"discord:{channel}"
    await memory.set_persona(key, persona)
    await memory.set_channel_guild(key, guild)
    approvals = Approvals(memory, context_turns=2)
    for i, (user_text, reply) in enumerate(pairs):
        author = f"10{i % 3}"
        await memory.add_turn(
            key, persona=persona, role="user", content=user_text,
            author_id=author, author_name=f"member{i % 3}",
        )  # fmt: skip
        turn = await memory.add_turn(
            key, persona=persona, role="assistant", content=reply, model="tiny"
        )
        await approvals.approve(turn, by="admin", guild_id=guild)


def retrain_settings(
    home: Path, adapters: Path, server_url: str, base: Path, **retrain: Any
) -> BotSettings:
    return BotSettings(
        home=home,
        server_url=server_url,
        adapters_dir=adapters,
        retry_attempts=1,
        retrain={  # type: ignore[arg-type]
            "base": str(base),
            "min_approved": 8,
            "max_length": 1024,
            "validation": 0.25,
            "eval_max_new_tokens": 8,
            "poll_s": 0.1,
            "train_args": TRAIN_ARGS,
            **retrain,
        },
    )


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(
        [
            "--model",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "1024",
            "--adapters-dir",
            str(adapters_root),
        ],
        log_path=tmp_path_factory.mktemp("retrain-server") / "server.log",
        startup_timeout=300,
    )
    with srv:
        yield srv


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[Memory]:
    async with Memory.open(tmp_path / "rolecast.db") as mem:
        yield mem


async def wait_until(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
