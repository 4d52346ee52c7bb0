"""Message flows: who gets answered, how replies are posted, and what happens when things fail.
dpytest's gateway, real SQLite, the instant model server over loopback HTTP."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import discord
import discord.ext.test as dpytest
import pytest

from bot.core.sidecar import free_port
from bot.discord.cogs.chat.listener import SERVER_DOWN_NOTICE
from bot.discord.webhooks import ReplyStream
from tests.discord.conftest import Rig, make_rig
from tests.discord.fakediscord import channel_texts, deliver
from tests.instant_server import InstantServer, ServerState

NO_PINGS = {"parse": []}


async def turns(rig: Rig) -> list[tuple[str, str]]:
    rows = await rig.memory.recent_turns(rig.key, "haruhi", limit=100)
    return [(t.role, t.content) for t in reversed(rows)]


async def test_mention_is_answered_through_the_persona_webhook(rig: Rig, server_state: ServerState):
    await rig.command("persona set", {"name": "haruhi"})
    greeting = rig.api.posts_in(rig.channel.id)[0]
    assert greeting.username == "凉宫春日"
    assert greeting.content.startswith("我对普通的人类没有兴趣")

    await rig.say(f"{rig.mention()} where is the SOS brigade room?")

    posts = rig.api.posts_in(rig.channel.id)
    assert len(posts) == 2
    reply = posts[1]
    assert reply.username == "凉宫春日"
    assert reply.allowed_mentions == NO_PINGS
    assert reply.content == "[instant-base] you said: alice_0_nick: where is the SOS brigade room?"
    stored = await turns(rig)
    assert stored[0][0] == "assistant"  # the greeting
    assert stored[1] == ("user", "where is the SOS brigade room?")  # mention removed
    assert stored[2] == ("assistant", reply.content)
    # The prompt sent to the model: card, greeting, the user's turn with the speaker's name.
    sent = server_state.requests[-1]["messages"]
    assert sent[0]["role"] == "system" and "凉宫春日" in sent[0]["content"]
    assert sent[-1] == {"role": "user", "content": "alice_0_nick: where is the SOS brigade room?"}
    # The reply's Discord message leads back to its turn (for reactions and approvals).
    turn = await rig.memory.turn_by_message(str(reply.message_id))
    assert turn is not None and turn.role == "assistant"


async def test_unmentioned_messages_bots_and_webhooks_are_ignored(rig: Rig):
    await rig.command("persona set", {"name": "haruhi"})
    await rig.say("just talking among ourselves")
    robot = dpytest.backend.make_user("robot", 7)
    robot.bot = True
    robot_member = dpytest.backend.make_member(robot, rig.guild)
    await rig.command(
        "channel mode", {"mode": "always"}, permissions=discord.Permissions(manage_guild=True)
    )
    deliver(rig.channel, robot_member, f"{rig.mention()} I am a bot")
    deliver(rig.channel, rig.alice, f"{rig.mention()} from a webhook", webhook_id=4242)
    await dpytest.run_all_events()
    assert len(rig.replies()) == 1  # only the greeting
    assert [role for role, _ in await turns(rig)] == ["assistant"]


async def test_reply_to_a_persona_message_is_answered(rig: Rig):
    await rig.command("persona set", {"name": "haruhi"})
    greeting = rig.api.posts_in(rig.channel.id)[0]
    deliver(rig.channel, rig.bob, "why so loud?", reply_to=greeting.message_id)
    await dpytest.run_all_events()
    assert rig.replies()[-1].endswith("bob_1_nick: why so loud?")


async def test_always_mode_answers_a_burst_once(rig: Rig, server_state: ServerState):
    await rig.command("persona set", {"name": "haruhi"})
    await rig.command(
        "channel mode", {"mode": "always"}, permissions=discord.Permissions(manage_guild=True)
    )
    for text in ("first", "second", "third"):
        deliver(rig.channel, rig.alice, text)
    await dpytest.run_all_events()
    assert len(rig.replies()) == 2  # the greeting and one answer
    prompt = server_state.requests[-1]["messages"]
    assert [m["content"] for m in prompt[-3:]] == [
        "alice_0_nick: first",
        "alice_0_nick: second",
        "alice_0_nick: third",
    ]
    # The persona's own webhook posts come back as messages: they must not start a loop.
    await dpytest.run_all_events()
    assert len(server_state.requests) == 1


async def test_replies_split_past_2000_characters(rig: Rig, server_state: ServerState):
    words = [f"word{i:04d}" for i in range(300)]  # ~2,700 characters
    server_state.reply = lambda body: " ".join(words)
    await rig.command("persona set", {"name": "xin"})
    await rig.say(f"{rig.mention()} tell me everything")
    posts = rig.api.posts_in(rig.channel.id)[1:]
    assert len(posts) == 2
    assert all(len(p.content) <= 2000 for p in posts)
    assert " ".join(p.content for p in posts).split() == words
    # Every part belongs to the same stored reply.
    first = await rig.memory.turn_by_message(str(posts[0].message_id))
    second = await rig.memory.turn_by_message(str(posts[1].message_id))
    assert first is not None and second is not None and first.id == second.id


async def test_streaming_edits_at_most_once_per_interval(
    tmp_path: Path,
    instant: InstantServer,
    server_state: ServerState,
    monkeypatch: pytest.MonkeyPatch,
):
    server_state.reply = lambda body: " ".join(f"w{i}" for i in range(24))
    server_state.token_delay_s = 0.1  # ~2.4 s of streaming
    async for rig in make_rig(tmp_path, instant.base_url, monkeypatch, edit_interval_s=1.0):
        await rig.command("persona set", {"name": "atri"})
        await rig.say(f"{rig.mention()} talk slowly")
        post = rig.api.posts_in(rig.channel.id)[-1]
        times = [t for t, _ in post.contents]
        assert len(times) >= 2, "the reply was not streamed"
        # The last version is the final flush; every earlier edit respects the interval.
        gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
        assert all(gap >= 0.95 for gap in gaps), gaps
        assert len(times) <= 5
        assert post.content == " ".join(f"w{i}" for i in range(24))


async def test_deleted_webhook_is_recreated(rig: Rig):
    await rig.command("persona set", {"name": "haruhi"})
    first = rig.api.posts_in(rig.channel.id)[0]
    rig.api.delete_webhook_now(first.webhook_id)
    await rig.say(f"{rig.mention()} are you still there?")
    reply = rig.api.posts_in(rig.channel.id)[-1]
    assert reply.webhook_id != first.webhook_id
    assert reply.content.endswith("are you still there?")


@pytest.mark.parametrize("how", ["no permission", "discord refuses"])
async def test_without_manage_webhooks_replies_are_plain_messages(rig: Rig, how: str):
    if how == "no permission":
        role = next(r for r in rig.guild.me.roles if r.name == "Rolecast")
        await dpytest.remove_role(rig.guild.me, role)
        assert not rig.channel.permissions_for(rig.guild.me).manage_webhooks
    else:
        rig.api.refuse_webhooks = True  # the permission looks granted, Discord says 403
    await rig.command("persona set", {"name": "haruhi"})
    await rig.say(f"{rig.mention()} hello")
    plain = channel_texts(rig.channel, rig.bot.user)
    assert plain[0].startswith("**凉宫春日**\n我对普通的人类")
    assert plain[-1].startswith("**凉宫春日**\n[instant-base] you said")
    assert rig.api.posts == {}


async def test_cooldown_keeps_the_turn_but_does_not_answer_it_alone(
    tmp_path: Path,
    instant: InstantServer,
    server_state: ServerState,
    monkeypatch: pytest.MonkeyPatch,
):
    async for rig in make_rig(tmp_path, instant.base_url, monkeypatch, cooldown_s=60):
        await rig.command("persona set", {"name": "haruhi"})
        await rig.say(f"{rig.mention()} one")
        second = await rig.say(f"{rig.mention()} two")
        assert len(rig.replies()) == 2
        assert any(str(r.emoji) == "⏳" for r in second.reactions)
        assert ("user", "two") in await turns(rig)


async def test_server_down_one_notice_turn_kept_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    async for rig in make_rig(tmp_path, url, monkeypatch):
        await rig.memory.set_persona(rig.key, "haruhi")
        with caplog.at_level(logging.WARNING):
            await rig.say(f"{rig.mention()} anyone home?")
            await rig.say(f"{rig.mention()} hello??")
        notices = []
        while not dpytest.sent_queue.empty():
            notices.append(dpytest.get_message().content)
        assert notices == [SERVER_DOWN_NOTICE]  # one notice, not in the persona's voice
        assert [c for _, c in await turns(rig)] == ["anyone home?", "hello??"]
        assert "Traceback" not in caplog.text

        state = ServerState()
        with InstantServer(state, port=port):
            await rig.say(f"{rig.mention()} back now?")
        assert rig.replies()[-1].endswith("back now?")
        contents = [m["content"] for m in state.requests[-1]["messages"][1:]]
        assert contents == [
            "alice_0_nick: anyone home?",
            "alice_0_nick: hello??",
            "alice_0_nick: back now?",
        ]


async def test_a_reply_discord_refuses_is_not_kept(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    await rig.memory.set_persona(rig.key, "haruhi")

    async def refused(
        self: ReplyStream, final_text: str | None = None, note: str | None = None
    ) -> list[str]:
        raise discord.Forbidden(dpytest.backend.FakeRequest(403, "Forbidden"), "Missing Access")

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING):
        patched.setattr(ReplyStream, "finish", refused)
        await rig.say(f"{rig.mention()} can you hear me?")
    # The user's words are kept; the reply nobody saw is not in the history.
    assert await turns(rig) == [("user", "can you hear me?")]
    assert "missing permissions" in caplog.text

    await rig.say(f"{rig.mention()} and now?")
    assert [role for role, _ in await turns(rig)] == ["user", "user", "assistant"]


async def test_missing_send_permission_tells_the_asker_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
):
    await rig.memory.set_persona(rig.key, "haruhi")
    role = next(r for r in rig.guild.me.roles if r.name == "Rolecast")
    await dpytest.remove_role(rig.guild.me, role)
    await dpytest.set_permission_overrides(rig.guild.default_role, rig.channel, send_messages=False)
    assert not rig.channel.permissions_for(rig.guild.me).send_messages
    with caplog.at_level(logging.WARNING):
        await rig.say(f"{rig.mention()} hi")
    dms = []
    while not dpytest.sent_queue.empty():
        dms.append(dpytest.get_message())
    assert len(dms) == 1
    assert isinstance(dms[0].channel, discord.DMChannel)
    assert "Send Messages" in dms[0].content
    assert "missing permissions" in caplog.text
    assert "Traceback" not in caplog.text
