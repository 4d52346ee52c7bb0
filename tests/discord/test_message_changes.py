"""Members editing and deleting their messages: the persona's memory follows. Each change comes
as the gateway payload Discord sends (MESSAGE_UPDATE, MESSAGE_DELETE, MESSAGE_DELETE_BULK),
which discord.py's parser turns into its raw event and dispatches to the bot; real SQLite, the
instant model server over loopback HTTP."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest

from bot.core.memory import Turn
from tests.discord.conftest import ADMIN, Rig
from tests.discord.fakediscord import (
    deliver,
    gateway,
    message_delete,
    message_delete_bulk,
    message_update,
    react,
    snowflake,
)
from tests.discord.test_scenes import by_name, scene, stored
from tests.instant_server import MESSAGE_OVERHEAD, ServerState


async def chat(rig: Rig, text: str, member: discord.Member | None = None) -> discord.Message:
    return await rig.say(f"{rig.mention()} {text}", member)


async def receive(event: str, data: dict[str, Any]) -> None:
    gateway(event, data)
    await dpytest.run_all_events()


async def contents(rig: Rig, persona: str = "haruhi") -> list[str]:
    return [t.content for t in reversed(await rig.memory.recent_turns(rig.key, persona, limit=99))]


async def turn_of(rig: Rig, message: discord.Message) -> Turn:
    found = [
        t
        for t in await rig.memory.recent_turns(rig.key, "haruhi", limit=99)
        if t.message_id == str(message.id)
    ]
    assert len(found) == 1
    return found[0]


def last_prompt(server_state: ServerState) -> str:
    """All the text of the persona's last chat prompt (not a summary request)."""
    chats = [
        r for r in server_state.requests if "keep the memory" not in r["messages"][0]["content"]
    ]
    return "\n".join(m["content"] for m in chats[-1]["messages"])


async def approve_by_reaction(rig: Rig, message_id: int) -> Turn:
    message = rig.bot._connection._get_message(message_id)
    assert message is not None
    react(message, rig.bob, "👍")
    await dpytest.run_all_events()
    reply = await rig.memory.turn_by_message(str(message_id))
    assert reply is not None and await rig.memory.dialogue_for_turn(reply.id) is not None
    return reply


async def test_a_deleted_message_is_forgotten_with_the_reply_that_answered_it(
    rig: Rig, server_state: ServerState
) -> None:
    await rig.command("persona set", {"name": "haruhi"})
    secret = await chat(rig, "my address is 12 Marker Lane")
    await chat(rig, "the club meets on friday", rig.bob)
    answer = rig.api.posts_in(rig.channel.id)[1]
    assert "Marker Lane" in answer.content  # (the instant server quotes the message)
    reply = await approve_by_reaction(rig, answer.message_id)
    await rig.memory.set_summary(rig.key, "haruhi", "alice: Marker Lane", through_id=reply.id)

    await receive("MESSAGE_DELETE", message_delete(secret.id, rig.channel.id, rig.guild.id))

    left = await contents(rig)
    assert not any("Marker Lane" in c for c in left)
    assert left[1:] == ["the club meets on friday", rig.replies()[-1]]  # bob's, and its reply
    assert await rig.memory.turn(reply.id) is None
    assert await rig.memory.count_dialogues("haruhi") == 0
    assert await rig.memory.score(reply.id) == (0, 0)
    assert await rig.memory.summary(rig.key, "haruhi") is None
    assert answer.content in rig.replies()  # the reply stays on Discord
    await chat(rig, "what do you remember?", rig.bob)
    assert "Marker Lane" not in last_prompt(server_state)


async def test_a_bulk_delete_forgets_the_members_messages_among_them(
    rig: Rig, server_state: ServerState
) -> None:
    await rig.command("persona set", {"name": "haruhi"})
    one = await chat(rig, "first marker-1")
    two = await chat(rig, "second marker-2", rig.bob)
    await chat(rig, "third stays")
    greeting = rig.api.posts_in(rig.channel.id)[0]
    purged = [one.id, greeting.message_id, two.id, snowflake()]  # and one memory never held

    await receive("MESSAGE_DELETE_BULK", message_delete_bulk(purged, rig.channel.id, rig.guild.id))

    left = await contents(rig)
    # the persona's own greeting is no member's message: it stays
    assert left[0] == greeting.content and left[1:] == ["third stays", rig.replies()[-1]]
    await chat(rig, "and now?")
    prompt = last_prompt(server_state)
    assert "marker-1" not in prompt and "marker-2" not in prompt


async def test_an_edited_message_is_remembered_as_edited(
    rig: Rig, server_state: ServerState
) -> None:
    server_state.reply = lambda body: "Noted."
    rig.bot.approvals.context_turns = 1  # a dialogue: the reply and the turn before it
    await rig.command("persona set", {"name": "haruhi"})
    said = await chat(rig, f"I live in Paris, ask <@{rig.bob.id}>")
    await chat(rig, "and I in Rome", rig.bob)
    posts = rig.api.posts_in(rig.channel.id)
    holds_paris = await approve_by_reaction(rig, posts[1].message_id)
    holds_rome = await approve_by_reaction(rig, posts[2].message_id)
    await rig.memory.set_summary(rig.key, "haruhi", "alice: Paris", through_id=holds_paris.id)
    turn = await turn_of(rig, said)
    assert turn.token_count is not None  # counted with the reply's prompt

    # Not edits: a link preview loading (the whole message again, with an embed and no edit
    # time), and the same in the older shape Discord sent, without `content` (discord.py 2.5+
    # builds its raw event from a whole message: built here as a library passing the gateway's
    # data through would).
    preview = {"type": "link", "url": "https://example.org/", "title": "Example"}
    await receive(
        "MESSAGE_UPDATE", message_update(said, said.content, edited=False, embeds=[preview])
    )
    partial = {
        "id": str(said.id),
        "channel_id": str(rig.channel.id),
        "guild_id": str(rig.guild.id),
        "embeds": [preview],
    }
    rig.bot.dispatch("raw_message_edit", discord.RawMessageUpdateEvent(partial, said))  # type: ignore[arg-type]
    await dpytest.run_all_events()
    assert await rig.memory.turn(turn.id) == turn
    assert await rig.memory.summary(rig.key, "haruhi") is not None
    assert await rig.memory.count_dialogues("haruhi") == 2

    edit = f"{rig.mention()} I live in Lyon now, ask <@{rig.bob.id}>"
    await receive("MESSAGE_UPDATE", message_update(said, edit))

    # cleaned as a new message is: the bot's mention dropped, bob's as his name
    edited = await rig.memory.turn(turn.id)
    assert edited is not None
    assert (edited.content, edited.token_count) == ("I live in Lyon now, ask @bob_1_nick", None)
    assert await rig.memory.summary(rig.key, "haruhi") is None
    assert await rig.memory.dialogue_for_turn(holds_paris.id) is None  # held the old text
    assert await rig.memory.dialogue_for_turn(holds_rome.id) is not None
    assert await rig.memory.turn(holds_paris.id) is not None  # the reply to it stays
    await chat(rig, "where do I live?")
    prompt = last_prompt(server_state)
    assert "alice_0_nick: I live in Lyon now, ask @bob_1_nick" in prompt
    assert "Paris" not in prompt
    recounted = await rig.memory.turn(turn.id)
    assert recounted is not None
    assert recounted.token_count == MESSAGE_OVERHEAD + len(
        "alice_0_nick: I live in Lyon now, ask @bob_1_nick".split()
    )


async def test_only_a_members_message_in_its_own_channel_and_guild_counts(rig: Rig) -> None:
    await rig.command("persona set", {"name": "haruhi"})
    said = await chat(rig, "keep me")
    post = rig.api.posts_in(rig.channel.id)[-1]
    reply = rig.bot._connection._get_message(post.message_id)
    assert reply is not None
    before = await contents(rig)
    here, guild, elsewhere = rig.channel.id, rig.guild.id, snowflake()
    for event, data in [
        ("MESSAGE_DELETE", message_delete(said.id, elsewhere, guild)),  # another channel
        ("MESSAGE_DELETE", message_delete(said.id, here, snowflake())),  # another guild
        ("MESSAGE_DELETE", message_delete(said.id, here, None)),  # a direct message
        ("MESSAGE_DELETE_BULK", message_delete_bulk([said.id], elsewhere, guild)),
        ("MESSAGE_UPDATE", message_update(said, "changed", channel_id=elsewhere)),
        # the persona's reply, edited as it streams, then deleted by a moderator
        ("MESSAGE_UPDATE", message_update(reply, "the reply, edited")),
        ("MESSAGE_DELETE", message_delete(post.message_id, here, guild)),
    ]:
        await receive(event, data)
    assert await contents(rig) == before

    await receive("MESSAGE_UPDATE", message_update(said, "changed"))
    assert await contents(rig) == [before[0], "changed", before[2]]
    # an edit that leaves no text (an attachment only) takes the message back
    await receive("MESSAGE_UPDATE", message_update(said, ""))
    assert await contents(rig) == [before[0]]


async def test_a_message_deleted_before_its_reply_began_is_not_answered(
    rig: Rig, server_state: ServerState
) -> None:
    await rig.memory.set_persona(rig.key, "haruhi")
    replying = asyncio.Event()

    async def busy() -> None:  # the channel's reply slot, held as by a reply in progress
        async with rig.bot.queue.slot(rig.key):
            replying.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(busy())
    await replying.wait()
    try:
        message = deliver(rig.channel, rig.alice, f"{rig.mention()} never mind")
        # handled after the message is stored, while its reply waits for the slot
        await asyncio.gather(
            *gateway("MESSAGE_DELETE", message_delete(message.id, rig.channel.id, rig.guild.id))
        )
        assert await contents(rig) == []
    finally:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    await dpytest.run_all_events()
    assert server_state.requests == [] and rig.replies() == []


@pytest.mark.parametrize("deleted", ["the newest", "an earlier one"])
async def test_a_reply_is_not_kept_when_a_message_it_answers_is_deleted_meanwhile(
    deleted: str, rig: Rig, server_state: ServerState
) -> None:
    asked, answer = threading.Event(), threading.Event()

    def slow(body: dict[str, Any]) -> str:  # the first reply waits until the test says
        asked.set()
        answer.wait(10)
        said = [m["content"] for m in body["messages"] if m["role"] == "user"]
        return "an answer to " + " and ".join(said)

    server_state.reply = slow
    await rig.memory.set_persona(rig.key, "haruhi")
    await rig.command("channel mode", {"mode": "always"}, permissions=ADMIN)
    first = deliver(rig.channel, rig.alice, "first words")
    second = deliver(rig.channel, rig.alice, "second words")
    replies = asyncio.ensure_future(dpytest.run_all_events())
    try:
        assert await asyncio.to_thread(asked.wait, 10)  # a reply to both is being written
        gone, words = (second, "second words") if deleted == "the newest" else (first, "first")
        await asyncio.gather(
            *gateway("MESSAGE_DELETE", message_delete(gone.id, rig.channel.id, rig.guild.id))
        )
    finally:
        answer.set()
    await replies
    # That reply is not kept. (The message left, if not answered yet, is answered on its own.)
    assert server_state.requests[0]["messages"][-1]["content"] == "alice_0_nick: second words"
    left = await contents(rig)
    assert left and not any(words in c for c in left)
    await rig.say("third words")
    assert words not in last_prompt(server_state)


async def test_an_edit_during_a_reply_is_applied_after_it(
    rig: Rig, server_state: ServerState
) -> None:
    asked, answer = threading.Event(), threading.Event()

    def slow(body: dict[str, Any]) -> str:
        asked.set()
        answer.wait(10)
        return "Noted."

    server_state.reply = slow
    await rig.memory.set_persona(rig.key, "haruhi")
    said = deliver(rig.channel, rig.alice, f"{rig.mention()} short")
    replies = asyncio.ensure_future(dpytest.run_all_events())
    try:
        assert await asyncio.to_thread(asked.wait, 10)  # its prompt counted "short"
        longer = "a much longer message than the one the reply was written from"
        edits = gateway("MESSAGE_UPDATE", message_update(said, f"{rig.mention()} {longer}"))
    finally:
        answer.set()
    await replies
    await asyncio.gather(*edits)
    # the reply is kept (it answered the message as it was), then the edit came: its text,
    # and no token count of the old text stored with the reply
    turn = await turn_of(rig, said)
    assert (turn.content, turn.token_count) == (longer, None)
    assert await contents(rig) == [longer, "Noted."]


async def test_in_a_scene_a_deleted_message_takes_every_personas_reply_to_it(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri")
    server_state.reply = by_name({"凉宫春日": "Haruhi on marker-9", "ATRI": "ATRI on marker-9"})
    said = await rig.say("凉宫春日, ATRI: what about marker-9?")
    assert {c for _, role, c in await stored(rig, "haruhi", "atri") if role == "assistant"} >= {
        "Haruhi on marker-9",
        "ATRI on marker-9",
    }
    await receive("MESSAGE_DELETE", message_delete(said.id, rig.channel.id, rig.guild.id))
    assert not any("marker-9" in c for _, _, c in await stored(rig, "haruhi", "atri"))
