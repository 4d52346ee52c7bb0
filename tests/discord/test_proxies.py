"""Proxy bots (PluralKit, Tupperbox): a member's message that a proxy bot deletes because it
re-posted it through its webhook under a character's name is not taken back; memory follows the
re-post. Each step comes as the gateway payload Discord sends (MESSAGE_CREATE of the webhook's
post, MESSAGE_DELETE of the member's message, MESSAGE_UPDATE of the re-post); the window is
played through on a clock the test moves, never waited for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.core.memory import Turn
from bot.core.proxies import ProxyWatch
from tests.discord.conftest import Rig, make_rig
from tests.discord.fakediscord import (
    deliver,
    gateway,
    message_delete,
    message_update,
    snowflake,
    webhook_message,
)
from tests.discord.test_message_changes import contents, last_prompt
from tests.instant_server import InstantServer, ServerState

WINDOW_S = 3.0
PROXY_BOT = snowflake()  # the proxy bot's webhook in the channel


class Clock:
    """The proxy window's clock, moved by the test: a sleep on it ends when the test moves the
    time past its end."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleeping: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleeping.append((self.now + seconds, done))
        await done

    @property
    def sleepers(self) -> int:
        return sum(not done.done() for _, done in self._sleeping)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for end, done in self._sleeping:
            if end <= self.now and not done.done():
                done.set_result(None)


@pytest.fixture
async def clock() -> Clock:
    return Clock()


async def proxy_rig(
    tmp_path: Path, instant: InstantServer, monkeypatch: pytest.MonkeyPatch, clock: Clock, **kw: Any
) -> AsyncIterator[Rig]:
    async for rig in make_rig(tmp_path, instant.base_url, monkeypatch, **kw):
        proxies = watch(rig)
        proxies.clock, proxies.sleep = clock, clock.sleep
        yield rig
        # a test that failed mid-window leaves no deletion waiting on this clock for ever:
        # released, it ends before the bot and its database close
        clock.advance(10**9)
        await asyncio.sleep(0.1)


@pytest.fixture
async def rig(
    tmp_path: Path,
    instant: InstantServer,
    server_state: ServerState,
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
) -> AsyncIterator[Rig]:
    async for r in proxy_rig(tmp_path, instant, monkeypatch, clock, proxy_window_s=WINDOW_S):
        yield r


def watch(rig: Rig) -> ProxyWatch:
    """The chat cogs' watch of other bots' webhook posts. (The cog's class is the extension's,
    loaded apart from this module's imports, so it is found by name.)"""
    proxies = getattr(rig.bot.get_cog("MessageChanges"), "proxies", None)
    assert isinstance(proxies, ProxyWatch)
    return proxies


async def settle(tasks: list[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks)


async def repost(rig: Rig, name: str, content: str, hook: int = PROXY_BOT) -> discord.Message:
    """Another bot's webhook posts in the channel (a proxy bot re-posting, by default)."""
    data = webhook_message(rig.channel, hook, name, content)
    await settle(gateway("MESSAGE_CREATE", data))
    message = rig.bot._connection._get_message(int(data["id"]))
    assert message is not None
    return message


async def say_meanwhile(rig: Rig, text: str, member: discord.Member) -> None:
    """A member's message, and the bot's answer to it, while a deletion waits for the window
    (dpytest's `message` would wait for that deletion too)."""
    before = asyncio.all_tasks()
    deliver(rig.channel, member, text)
    await settle(list(asyncio.all_tasks() - before))


def delete(rig: Rig, message_id: int) -> list[asyncio.Task[Any]]:
    """A MESSAGE_DELETE; the tasks handling it, which may wait for the window."""
    return gateway("MESSAGE_DELETE", message_delete(message_id, rig.channel.id, rig.guild.id))


async def until_waiting(clock: Clock, count: int = 1) -> None:
    """Until `count` deletions wait for the window (they wait on the clock). Before that, each
    stores or reads through the database's thread, which a loaded machine can make slow: the
    wait is for the condition, bounded generously, not a number of event-loop turns."""
    for _ in range(6000):  # 60 s at most
        if clock.sleepers >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no deletion waits for the window")


async def turn_with(rig: Rig, message_id: int) -> Turn | None:
    turns = await rig.memory.member_turns(str(rig.guild.id), rig.key, [str(message_id)])
    return turns[0] if turns else None


TAGGED = "[Aria: {mention} the lighthouse keeper waves hello]"
PROXIED = "{mention} the lighthouse keeper waves hello"


@pytest.mark.parametrize("repost_comes", ["before the deletion", "after the deletion"])
async def test_a_message_a_proxy_bot_reposts_stays_as_the_repost(
    repost_comes: str, rig: Rig, clock: Clock, server_state: ServerState
) -> None:
    server_state.reply = lambda body: "Hello to you too."
    await rig.command("persona set", {"name": "haruhi"})
    said = await rig.say(TAGGED.format(mention=rig.mention()))
    kept = await turn_with(rig, said.id)
    assert kept is not None and kept.author_name == "alice_0_nick"
    reply = rig.replies()[-1]

    if repost_comes == "before the deletion":
        proxied = await repost(rig, "Aria", PROXIED.format(mention=rig.mention()))
        await settle(delete(rig, said.id))
    else:
        deleting = delete(rig, said.id)
        await until_waiting(clock)
        proxied = await repost(rig, "Aria", PROXIED.format(mention=rig.mention()))
        await settle(deleting)

    assert await turn_with(rig, said.id) is None
    moved = await turn_with(rig, proxied.id)
    assert moved is not None
    assert (moved.id, moved.content, moved.author_name, moved.author_id) == (
        kept.id,
        "the lighthouse keeper waves hello",
        "Aria",
        str(rig.alice.id),  # still the member's: forget-me finds it
    )
    assert await contents(rig) == [rig.replies()[0], moved.content, reply]  # the reply stays
    await rig.say(f"{rig.mention()} what did Aria say?", rig.bob)
    prompt = last_prompt(server_state)
    assert "Aria: the lighthouse keeper waves hello" in prompt
    assert "[Aria:" not in prompt


async def test_the_reposts_edit_and_deletion_are_followed(rig: Rig, clock: Clock) -> None:
    await rig.command("persona set", {"name": "haruhi"})
    said = await rig.say(TAGGED.format(mention=rig.mention()))
    proxied = await repost(rig, "Aria", PROXIED.format(mention=rig.mention()))
    await settle(delete(rig, said.id))

    # `pk;edit`: the proxy bot edits its own post
    await settle(gateway("MESSAGE_UPDATE", message_update(proxied, "the keeper waves goodbye")))
    moved = await turn_with(rig, proxied.id)
    assert moved is not None and moved.content == "the keeper waves goodbye"

    # the ❌ reaction: the proxy bot deletes its post, and nothing re-posts it
    deleting = delete(rig, proxied.id)
    await until_waiting(clock)
    assert await turn_with(rig, proxied.id) is not None  # the window is open
    clock.advance(WINDOW_S)
    await settle(deleting)
    assert await turn_with(rig, proxied.id) is None
    assert not any("keeper" in c for c in await contents(rig))


async def test_an_unrelated_webhook_post_does_not_save_a_deleted_message(
    rig: Rig, clock: Clock, server_state: ServerState
) -> None:
    await rig.command("persona set", {"name": "haruhi"})
    said = await rig.say(f"{rig.mention()} ok, my secret is marker-7 and the door code 4417")
    # the whole secret, re-posted long before: not this deletion's proxy any more
    await repost(rig, "Feed", "ok, my secret is marker-7 and the door code 4417")
    clock.advance(WINDOW_S + 1)
    await repost(rig, "Feed", "ok")  # in the message, but too short to tell
    await repost(rig, "Feed", "the daily news: the tide is high")

    deleting = delete(rig, said.id)
    await until_waiting(clock)
    await repost(rig, "Feed", "door")
    clock.advance(WINDOW_S)
    await settle(deleting)

    assert await turn_with(rig, said.id) is None
    assert not any("marker-7" in c for c in await contents(rig))
    await rig.say(f"{rig.mention()} what was the secret?", rig.bob)
    assert "marker-7" not in last_prompt(server_state)


async def test_rolecasts_own_webhook_posts_never_count(
    rig: Rig, clock: Clock, server_state: ServerState
) -> None:
    text = "the club meets on friday at noon"
    server_state.reply = lambda body: text  # the persona says back the member's words
    await rig.command("persona set", {"name": "haruhi"})
    said = await rig.say(f"{rig.mention()} {text}")
    assert rig.replies()[-1] == text
    assert len(watch(rig)) == 0  # the persona's replies are not kept as posts

    deleting = delete(rig, said.id)
    await until_waiting(clock)
    await say_meanwhile(rig, f"{rig.mention()} {text}", rig.bob)  # answered: the same words
    assert await turn_with(rig, said.id) is not None  # the window is open
    clock.advance(WINDOW_S)
    await settle(deleting)
    assert await turn_with(rig, said.id) is None
    assert [c for c in await contents(rig) if c == text] == [text, text]  # bob's, its reply


async def test_a_window_of_0_deletes_at_once(
    tmp_path: Path,
    instant: InstantServer,
    server_state: ServerState,
    monkeypatch: pytest.MonkeyPatch,
    clock: Clock,
) -> None:
    async for rig in proxy_rig(tmp_path, instant, monkeypatch, clock, proxy_window_s=0):
        await rig.command("persona set", {"name": "haruhi"})
        said = await rig.say(TAGGED.format(mention=rig.mention()))
        await repost(rig, "Aria", PROXIED.format(mention=rig.mention()))
        await settle(delete(rig, said.id))
        assert clock.sleepers == 0
        assert not any("lighthouse" in c for c in await contents(rig))
        assert len(watch(rig)) == 0


async def test_the_posts_kept_stay_few(rig: Rig, clock: Clock) -> None:
    proxies = watch(rig)
    proxies.per_channel, proxies.most = 4, 10
    await rig.memory.set_persona(rig.key, "haruhi")
    for n in range(9):
        await repost(rig, "Aria", f"a line of role-play number {n}")
    assert len(proxies) == 4  # one channel's cap: the newest
    others = [await rig.guild.create_text_channel(f"room-{n}") for n in range(4)]
    for channel in others:
        for n in range(3):
            data = webhook_message(channel, PROXY_BOT, "Aria", f"elsewhere, line {n}")
            await settle(gateway("MESSAGE_CREATE", data))
    assert len(proxies) == 10  # the cap in all: the oldest channel's posts went first
    clock.advance(WINDOW_S + 1)
    await repost(rig, "Aria", "one more line of role-play")
    assert len(proxies) == 1  # the others are older than the window

    # a post dropped for the cap saves no deletion
    said = await rig.say(f"{rig.mention()} a line of role-play number 0, and more")
    for n in range(4):
        await repost(rig, "Aria", f"unrelated chatter number {n}")
    await repost(rig, "Aria", "a line of role-play number 0", hook=snowflake())
    for n in range(4):
        await repost(rig, "Aria", f"more unrelated chatter {n}")
    deleting = delete(rig, said.id)
    await until_waiting(clock)
    clock.advance(WINDOW_S)
    await settle(deleting)
    assert await turn_with(rig, said.id) is None
