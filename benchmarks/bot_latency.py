"""The Discord bot's own cost per message, and prompt assembly time against history size.

Prints JSON lines:
- `per_message`: a mention handled end to end by the real bot (dpytest gateway, the chat cog,
  SQLite, prompt assembly, HTTP streaming from the instant model server in its own process,
  the webhook post). The bot's own cost is the chat cog's handler time minus what the instant
  server and loopback HTTP take by themselves (the same request sent with a bare HTTP
  client); the client's request building and SSE parsing count as the bot's. Also its parts:
  storing the user's turn, assembling the prompt, the model round trip through the client; the
  CPU time the bot's process spends per message, which other load on the machine barely moves;
  and the `/tokenize` calls and SQLite commits the bot makes per message. Twice: in a channel
  with one persona, and in a scene of three (haruhi, atri, xin) where each message names
  nobody and one persona answers it in turn, its prompt holding the other two's replies as
  named turns (`"cast": 3`).
- `assembly`: `PromptBuilder.build` for a channel holding 1,000 vs 100,000 stored turns
  (token counts cached as in steady state): p50/p99 and the ratio. Target: flat within 20%.

Run from the repository root: `.venv/bin/python benchmarks/bot_latency.py [--messages 300]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.core.client import ModelClient  # noqa: E402
from bot.core.memory import Memory  # noqa: E402
from bot.core.personas import PersonaRegistry  # noqa: E402
from bot.core.prompt import PromptBuilder  # noqa: E402
from bot.core.sidecar import free_port  # noqa: E402
from bot.settings import BotSettings  # noqa: E402


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "n": len(ordered),
    }


def start_instant_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.instant_server",
            "--port",
            str(port),
            "--max-model-len",
            "8192",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the instant server did not start")


async def timed(fn: Callable[[], Awaitable[Any]], into: list[float]) -> Any:
    started = time.perf_counter()
    result = await fn()
    into.append(time.perf_counter() - started)
    return result


async def per_message(
    url: str, home: Path, messages: int, cast: tuple[str, ...] = ("haruhi",)
) -> dict[str, Any]:
    import discord
    import discord.ext.test as dpytest
    import pytest

    from bot.discord.bot import RolecastBot, channel_key
    from tests.discord.fakediscord import FakeDiscordAPI

    settings = BotSettings(
        home=home,
        server_url=url,
        discord={"cooldown_s": 0, "burst_window_s": 0, "sync_commands": False},  # type: ignore[arg-type]
        prompt={"summaries": False},  # type: ignore[arg-type]
    )
    personas = PersonaRegistry(None).load()
    monkeypatch = pytest.MonkeyPatch()
    async with (
        Memory.open(home / f"bot-{len(cast)}.db") as memory,
        ModelClient(url) as client,
    ):
        bot = RolecastBot(
            memory=memory,
            client=client,
            personas=personas,
            settings=settings,
            intents=discord.Intents.all(),
        )
        # The bot's own work per message is the chat cog's handler: from the gateway event to
        # the reply stored and posted. Timed by wrapping the handler before the cog loads;
        # dpytest's fake gateway around it is test harness, not bot.
        from bot.discord.cogs.chat.listener import ChatListener

        handler: list[float] = []
        on_message = ChatListener.on_message

        async def on_message_timed(self: ChatListener, message: discord.Message) -> None:
            started = time.perf_counter()
            await on_message(self, message)
            if not message.author.bot and message.webhook_id is None:
                handler.append(time.perf_counter() - started)

        monkeypatch.setattr(ChatListener, "on_message", on_message_timed)
        await bot._async_setup_hook()
        dpytest.configure(bot, members=["alice"])
        assert bot.user is not None
        bot._connection.application_id = bot.user.id
        await bot.setup_hook()
        api = FakeDiscordAPI(bot)
        api.install(monkeypatch)
        config = dpytest.get_config()
        guild, channel, alice = config.guilds[0], config.channels[0], config.members[0]
        role = dpytest.backend.make_role(
            "Rolecast",
            guild,
            permissions=(
                discord.Permissions(104324161) | discord.Permissions(manage_webhooks=True)
            ).value,
        )
        await dpytest.add_role(guild.me, role)
        key = channel_key(channel)
        await memory.set_cast(key, cast)  # one persona, or a scene
        # Steady state: a ~1,900-token history budget (8,192 context - 6,300 reply tokens), so
        # after the warm-up every prompt holds the same number of turns however long the run.
        await memory.set_channel_sampling(key, {"max_tokens": 6300})
        mention = f"<@{bot.user.id}>"

        # Time the parts the chat cog runs, by wrapping them (same calls, same order).
        store: list[float] = []
        assemble: list[float] = []
        model: list[float] = []
        add_turn, build, stream_chat = memory.add_turn, bot.chat.prompts.build, client.stream_chat

        async def add_turn_timed(*a: Any, **k: Any) -> Any:
            if k.get("role") != "user":
                return await add_turn(*a, **k)
            return await timed(lambda: add_turn(*a, **k), store)

        async def build_timed(*a: Any, **k: Any) -> Any:
            return await timed(lambda: build(*a, **k), assemble)

        last_prompt: list[Any] = []

        async def stream_timed(*a: Any, **k: Any) -> Any:
            last_prompt[:] = [a[0], a[1]]
            started = time.perf_counter()
            async for event in stream_chat(*a, **k):
                yield event
            model.append(time.perf_counter() - started)

        calls = {"tokenize": 0, "sqlite_commit": 0}
        tokenize, commit = client.tokenize, memory.db.commit

        async def tokenize_counted(*a: Any, **k: Any) -> Any:
            calls["tokenize"] += 1
            return await tokenize(*a, **k)

        async def commit_counted() -> None:
            calls["sqlite_commit"] += 1
            await commit()

        monkeypatch.setattr(memory, "add_turn", add_turn_timed)
        monkeypatch.setattr(bot.chat.prompts, "build", build_timed)
        monkeypatch.setattr(client, "stream_chat", stream_timed)
        monkeypatch.setattr(client, "tokenize", tokenize_counted)
        monkeypatch.setattr(memory.db, "commit", commit_counted)

        total: list[float] = []
        cpu: list[float] = []
        for i in range(messages + 100):
            started, started_cpu = time.perf_counter(), time.process_time()
            await dpytest.message(
                f"{mention} message number {i} about the club room", channel, alice
            )
            if i >= 100:  # warm-up: fill the history budget, first calls, code paths
                total.append(time.perf_counter() - started)
                cpu.append(time.process_time() - started_cpu)
            if i == 99:
                calls.update(dict.fromkeys(calls, 0))
        await bot.chat.prompts.aclose()  # counts still running in the background
        per_call = {name: round(n / messages, 3) for name, n in calls.items()}
        # who answered (in a scene: each in turn, one reply per message)
        replies_by = Counter(post.username for post in api.posts_in(channel.id))
        for part in (store, assemble, model, handler):
            del part[: len(part) - messages]
        monkeypatch.undo()
        await dpytest.empty_queue()
        for name in list(bot.extensions):
            await bot.unload_extension(name)
    floor = await instant_floor(url, *last_prompt, repeats=messages)
    floor_p50 = statistics.median(floor)
    return {
        "bench": "per_message",
        "cast": len(cast),
        "messages": messages,
        "prompt_messages": len(last_prompt[1]),
        "whole_incl_test_gateway": quantiles(total),
        # CPU time of this process per message (all its threads: the bot, its SQLite thread,
        # and the in-process test gateway): what the bot costs a machine, and much less
        # sensitive than wall time to other load on a shared machine.
        "bot_process_cpu_incl_test_gateway": quantiles(cpu),
        "bot_handler": quantiles(handler),
        "bot_own_cost_handler_minus_instant_server_floor": quantiles(
            [h - floor_p50 for h in handler]
        ),
        "calls_per_message": per_call,
        "replies_by": dict(replies_by),
        "store_user_turn": quantiles(store),
        "assemble_prompt": quantiles(assemble),
        "model_round_trip_through_client": quantiles(model),
        "instant_server_floor_raw_http": quantiles(floor),
    }


async def instant_floor(url: str, model: str, messages: list[Any], *, repeats: int) -> list[float]:
    """What the instant server and loopback HTTP cost on their own: the same streaming request
    the bot sends, posted with a bare HTTP client that reads the bytes and parses nothing."""
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 64,
    }
    samples: list[float] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(repeats + 20):
            started = time.perf_counter()
            async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
                async for _ in response.aiter_bytes():
                    pass
            samples.append(time.perf_counter() - started)
    return samples[20:]


async def assembly(url: str, home: Path, sizes: list[int], repeats: int) -> dict[str, Any]:
    personas = PersonaRegistry(None).load()
    persona = personas.get("haruhi")
    results: dict[str, Any] = {}
    async with Memory.open(home / "assembly.db") as memory, ModelClient(url) as client:
        builder = PromptBuilder(memory, client, speaker_names=True)
        model = await client.model_for("haruhi")
        for size in sizes:
            channel = f"bench:{size}"
            await memory.set_persona(channel, "haruhi")
            now = time.time()
            rows = [
                (
                    channel,
                    "haruhi",
                    "user" if i % 2 == 0 else "assistant",
                    "u1" if i % 2 == 0 else None,
                    "alice" if i % 2 == 0 else None,
                    f"turn {i}: the SOS brigade meets after school in the literary club room",
                    18,
                    None,
                    None,
                    now,
                )
                for i in range(size)
            ]
            await memory.db.executemany(
                "INSERT INTO turns (channel_id, persona, role, author_id, author_name, content,"
                " token_count, model, message_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            await memory.db.commit()

        async def build(size: int) -> Any:
            # A 4,096-token context: the prompt holds ~200 turns, whatever the history size.
            return await builder.build(
                f"bench:{size}", persona.card, "haruhi", model=model, max_tokens=4096
            )

        for size in sizes:
            for _ in range(5):
                await build(size)
        # The sizes take turns, so a slow spell of the machine hits each of them alike and the
        # ratio compares like with like.
        samples: dict[int, list[float]] = {size: [] for size in sizes}
        prompts: dict[int, Any] = {}
        for _ in range(repeats):
            for size in sizes:
                started = time.perf_counter()
                prompts[size] = await build(size)
                samples[size].append(time.perf_counter() - started)
        for size in sizes:
            results[str(size)] = {
                **quantiles(samples[size]),
                "turns_in_prompt": prompts[size].turns_included,
            }
    small, large = str(sizes[0]), str(sizes[-1])
    ratio = results[large]["p50_ms"] / results[small]["p50_ms"]
    return {
        "bench": "assembly",
        "by_stored_turns": results,
        "p50_ratio_large_vs_small": round(ratio, 3),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    port = free_port()
    server = start_instant_server(port)
    url = f"http://127.0.0.1:{port}/v1"
    machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp)
            print(json.dumps({**await per_message(url, home, args.messages), **machine}))
            scene = await per_message(url, home, args.messages, ("haruhi", "atri", "xin"))
            print(json.dumps({**scene, **machine}))
            print(
                json.dumps({**await assembly(url, home, [1_000, 100_000], args.repeats), **machine})
            )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
