"""Scenes on Discord: several personas in one channel, on dpytest's gateway with real SQLite and
the instant model server over loopback HTTP. Who answers (named, mentioned, replied to, the
channel's policy, the turn handed on), personas answering one another up to the chain limit,
a person's message interrupting them, bursts, requests sent together, approvals, export and
forget-me per persona."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import discord.ext.test as dpytest

from bot.core.cards import parse_card
from bot.core.prompt import scene_note
from bot.discord.cogs.scene.commands import MAX_CAST
from tests.discord.conftest import ADMIN, Rig, read_jsonl
from tests.discord.fakediscord import channel_texts, deliver, react
from tests.instant_server import ServerState

NAMES = {"haruhi": "凉宫春日", "atri": "ATRI", "xin": "星锑"}
_NOTE = re.compile(r"Write only (.+?)'s next reply\.")


def speaking(body: dict[str, Any]) -> str:
    """The persona a chat request is for, from the scene note after its card."""
    found = _NOTE.search(body["messages"][0]["content"])
    assert found is not None, "not a scene prompt"
    return found.group(1)


def by_name(replies: dict[str, str]) -> Any:
    """A reply function: what each persona (by name) says."""
    return lambda body: replies.get(speaking(body), "……")


async def scene(rig: Rig, *keys: str, mode: str = "mention") -> None:
    for key in keys:
        await rig.command("scene add", {"persona": key}, permissions=ADMIN)
    if mode != "mention":
        await rig.command("channel mode", {"mode": mode}, permissions=ADMIN)


def posts(rig: Rig) -> list[tuple[str | None, str]]:
    """(webhook username, text) of every persona post in the channel, oldest first."""
    return [(p.username, p.content) for p in rig.api.posts_in(rig.channel.id)]


async def stored(rig: Rig, *keys: str) -> list[tuple[str, str, str]]:
    turns = await rig.memory.recent_turns(rig.key, tuple(keys), limit=200)
    return [(t.persona, t.role, t.content) for t in reversed(turns)]


async def test_a_cast_speaks_each_under_its_own_name_and_card(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri")
    assert "Scene here: **凉宫春日** (`haruhi`), **ATRI** (`atri`)" in rig.last_response()
    greetings = posts(rig)
    assert [name for name, _ in greetings] == ["凉宫春日", "ATRI"]  # each member's first_mes

    server_state.reply = by_name({"ATRI": "ATRI is a high-performance robot!"})
    await rig.say("ATRI, who are you?")
    assert posts(rig)[-1] == ("ATRI", "ATRI is a high-performance robot!")
    # its own card, the scene note, and the others' turns under their names
    sent = server_state.requests[-1]["messages"]
    assert sent[0]["content"].startswith("你是来自《ATRI")
    assert sent[0]["content"].endswith(scene_note("ATRI"))
    haruhi_greeting = greetings[0][1]
    assert {"role": "user", "content": f"凉宫春日:\n{haruhi_greeting}"} in sent
    assert {"role": "assistant", "content": greetings[1][1]} in sent
    assert sent[-1] == {"role": "user", "content": "alice_0_nick: ATRI, who are you?"}
    assert (await stored(rig, "haruhi", "atri"))[-2:] == [
        ("atri", "user", "ATRI, who are you?"),
        ("atri", "assistant", "ATRI is a high-performance robot!"),
    ]

    await rig.command("scene list")
    assert "the next in turn" in rig.last_response()
    # /persona set no longer replaces the cast behind the admins' backs
    await rig.command("persona set", {"name": "xin"})
    assert "This channel has a scene" in rig.last_response()
    assert await rig.memory.cast(rig.key) == ("haruhi", "atri")


async def test_named_mentioned_and_replied_to(rig: Rig, server_state: ServerState) -> None:
    await scene(rig, "haruhi", "atri", "xin")
    server_state.reply = lambda body: f"{speaking(body)} here"
    # no trigger in a mention channel: nobody addressed, the bot not mentioned
    await rig.say("just chatting among ourselves")
    assert len(posts(rig)) == 3

    # named (key or name, any case): that persona alone
    await rig.say("hey xin, what's up?")
    assert posts(rig)[-1] == ("星锑", "星锑 here")
    await rig.say("凉宫春日你好")
    assert posts(rig)[-1] == ("凉宫春日", "凉宫春日 here")

    # a reply to a persona's webhook message: the persona that sent it
    atri_post = next(p for p in rig.api.posts_in(rig.channel.id) if p.username == "ATRI")
    deliver(rig.channel, rig.bob, "you there?", reply_to=atri_post.message_id)
    await dpytest.run_all_events()
    assert posts(rig)[-1] == ("ATRI", "ATRI here")

    # the bot mentioned with nobody named: one persona answers, the next in turn
    before = len(posts(rig))
    await rig.say(f"{rig.mention()} anyone?")
    assert len(posts(rig)) == before + 1
    assert posts(rig)[-1][0] == "星锑"  # after ATRI, the last to speak

    # several addressed: each answers once, the one replied to first, then by the text's order
    before = len(posts(rig))
    deliver(rig.channel, rig.alice, "XIN and 凉宫春日 and xin again", reply_to=atri_post.message_id)
    await dpytest.run_all_events()
    assert [name for name, _ in posts(rig)[before:]] == ["ATRI", "星锑", "凉宫春日"]
    rows = await stored(rig, "haruhi", "atri", "xin")
    assert [(p, r) for p, r, _ in rows[-4:]] == [
        ("atri", "user"),
        ("atri", "assistant"),
        ("xin", "assistant"),
        ("haruhi", "assistant"),
    ]
    # a webhook's own message (a persona's post coming back) is never heard
    deliver(rig.channel, rig.alice, "ATRI, loop?", webhook_id=4242)
    await dpytest.run_all_events()
    assert len(posts(rig)) == before + 3


async def test_always_mode_gives_one_reply_to_a_message_addressed_to_nobody(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri", "xin", mode="always")
    server_state.reply = lambda body: f"{speaking(body)} answers"
    rounds = []
    for text in ("good morning", "what a day", "shall we go", "one more"):
        before = len(server_state.requests)
        await rig.say(text)
        await dpytest.run_all_events()
        assert len(server_state.requests) == before + 1  # one reply, not one per persona
        rounds.append(posts(rig)[-1][0])
    assert rounds == ["凉宫春日", "ATRI", "星锑", "凉宫春日"]  # round-robin from the first

    # the turn handed on: that persona takes the next unaddressed message, once
    await rig.command("scene next", {"persona": "xin"}, member=rig.bob)
    assert "**星锑** (`xin`) answers the next message" in rig.last_response()
    await rig.say("and now?")
    assert posts(rig)[-1][0] == "星锑"
    await rig.say("and then?")
    assert posts(rig)[-1][0] == "凉宫春日"  # round-robin again, after 星锑

    # keywords: the member whose card tags or lorebook keys the message matches
    await rig.command("scene turns", {"policy": "keywords"}, permissions=ADMIN)
    await rig.say("do you like robot stories?")
    assert posts(rig)[-1][0] == "ATRI"  # ATRI's card is tagged "robot"
    await rig.say("the sos-brigade meets today")
    assert posts(rig)[-1][0] == "凉宫春日"
    await rig.say("nothing in particular")
    assert posts(rig)[-1][0] == "ATRI"  # no keyword: round-robin, after 凉宫春日


async def test_personas_answer_one_another_up_to_the_chain_limit(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri", "xin")
    # every reply names the next persona: without a limit they would talk forever
    server_state.reply = by_name(
        {
            "凉宫春日": "ATRI, your turn!",
            "ATRI": "星锑, what do you say?",
            "星锑": "凉宫春日 decides.",
        }
    )
    start = len(posts(rig))
    await rig.say("凉宫春日, start the meeting")
    await dpytest.run_all_events()
    assert [name for name, _ in posts(rig)[start:]] == ["凉宫春日", "ATRI"]  # default limit 2

    await rig.command("scene turns", {"chain_limit": 4}, permissions=ADMIN)
    start = len(posts(rig))
    await rig.say("凉宫春日, again")
    await dpytest.run_all_events()
    assert [name for name, _ in posts(rig)[start:]] == ["凉宫春日", "ATRI", "星锑", "凉宫春日"]
    # a chain reply sees the replies before it, as the others' named turns
    last = server_state.requests[-1]["messages"]
    assert last[-2:] == [
        {"role": "user", "content": "ATRI:\n星锑, what do you say?"},
        {"role": "user", "content": "星锑:\n凉宫春日 decides."},
    ]
    # replies in a chain are written for the member's message that began it
    rows = await rig.memory.recent_turns(rig.key, ("haruhi", "atri", "xin"), limit=5)
    asked = rows[4]
    assert asked.role == "user" and all(t.prompted_by == asked.id for t in rows[:4])

    await rig.command("scene turns", {"chain_limit": 0}, permissions=ADMIN)
    start = len(posts(rig))
    await rig.say("凉宫春日, once more")
    await dpytest.run_all_events()
    assert [name for name, _ in posts(rig)[start:]] == ["凉宫春日"]  # they never answer each other
    # several addressed still answer, each once
    start = len(posts(rig))
    await rig.say("凉宫春日 and ATRI, both of you")
    await dpytest.run_all_events()
    assert [name for name, _ in posts(rig)[start:]] == ["凉宫春日", "ATRI"]


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_a_person_interrupts_a_chain(rig: Rig, server_state: ServerState) -> None:
    await scene(rig, "haruhi", "atri")
    long = " ".join(f"word{i}" for i in range(60))
    server_state.reply = by_name({"凉宫春日": "ATRI, tell them.", "ATRI": f"凉宫春日 {long}"})
    server_state.token_delay_s = 0.03  # ~2 s for ATRI's reply
    start = len(posts(rig))
    deliver(rig.channel, rig.alice, "凉宫春日, what now?")
    # ATRI's chain reply has begun to show...
    await until(lambda: len(posts(rig)) >= start + 2)
    requests = len(server_state.requests)
    # ...when a person speaks (not even to the personas)
    deliver(rig.channel, rig.bob, "hold on, everyone")
    await dpytest.run_all_events()
    names = [name for name, _ in posts(rig)[start:]]
    assert names == ["凉宫春日", "ATRI"]
    cut = posts(rig)[-1][1]
    assert cut.endswith("*[reply interrupted]*") and long not in cut
    rows = await rig.memory.recent_turns(rig.key, ("haruhi", "atri"), limit=1)
    kept = rows[0]
    # kept as shown, never as complete, and not approvable
    assert (kept.persona, kept.complete, kept.finish_reason) == ("atri", False, None)
    assert kept.content.startswith("凉宫春日 word0") and kept.content != f"凉宫春日 {long}"
    assert len(server_state.requests) == requests  # nothing more was asked
    post = rig.api.posts_in(rig.channel.id)[-1]
    assert (await rig.memory.turn_by_message(str(post.message_id))) == kept


async def test_bursts_never_loop(rig: Rig, server_state: ServerState) -> None:
    """Bursts of messages, some while personas answer one another: each burst gets one answer,
    each chain stops at its limit or at the next person's message, and then all is quiet."""
    await scene(rig, "haruhi", "atri", "xin", mode="always")
    filler = " ".join(["la"] * 12)
    server_state.reply = by_name(
        {
            "凉宫春日": f"ATRI, answer! {filler}",
            "ATRI": f"星锑, answer! {filler}",
            "星锑": f"凉宫春日, answer! {filler}",
        }
    )
    server_state.token_delay_s = 0.02  # ~0.3 s a reply
    await rig.command("scene turns", {"chain_limit": 3}, permissions=ADMIN)
    for n in range(3):
        before = len(posts(rig))
        for text in ("one", "two", "three"):
            deliver(rig.channel, rig.alice, f"{text} {n}")
        await until(lambda b=before: len(posts(rig)) >= b + 2)  # a chain reply is showing
        deliver(rig.channel, rig.bob, f"me too {n}")  # interrupts it
    await dpytest.run_all_events()
    settled, replies = len(server_state.requests), len(posts(rig))
    # 3 bursts and 3 messages of bob's: at most one answer and a chain of 3 bot turns each
    assert settled <= 6 * 3
    await asyncio.sleep(1.0)
    await dpytest.run_all_events()
    assert (len(server_state.requests), len(posts(rig))) == (settled, replies)
    turns = await rig.memory.recent_turns(rig.key, ("haruhi", "atri", "xin"), limit=200)
    cut = [t for t in turns if not t.complete]
    assert cut and all(t.finish_reason is None and filler not in t.content for t in cut)
    for turn in cut:
        post = next(
            p for p in rig.api.posts_in(rig.channel.id) if str(p.message_id) == turn.message_id
        )
        assert post.content.endswith("*[reply interrupted]*")
    whole = [t for t in turns if t.role == "assistant" and t.complete and t.prompted_by]
    assert whole and all(t.content.endswith(filler) for t in whole)
    # one answer a burst: alice's three messages never got three answers
    asked = {t.prompted_by for t in turns if t.prompted_by}
    alice = [t for t in turns if t.author_id == str(rig.alice.id)]
    assert len(asked & {t.id for t in alice}) <= 3


async def test_addressed_personas_are_asked_together(rig: Rig, server_state: ServerState) -> None:
    await scene(rig, "haruhi", "atri", "xin")
    arrived: dict[str, float] = {}

    def reply(body: dict[str, Any]) -> str:
        arrived[speaking(body)] = time.monotonic()
        return " ".join(["la"] * 20)

    server_state.reply = reply
    server_state.token_delay_s = 0.02  # each stream takes ~0.4 s
    started = time.monotonic()
    await rig.say("星锑, ATRI, 凉宫春日: sing!")
    finished = time.monotonic()
    # all three requests reached the server before the first reply could have finished
    assert set(arrived) == {"星锑", "ATRI", "凉宫春日"}
    assert max(arrived.values()) - started < 0.3
    assert finished - started < 3 * 0.4  # not one after another
    # shown and stored in the order the message named them
    assert [name for name, _ in posts(rig)[-3:]] == ["星锑", "ATRI", "凉宫春日"]
    rows = await stored(rig, "haruhi", "atri", "xin")
    assert [p for p, r, _ in rows[-3:]] == ["xin", "atri", "haruhi"]


async def test_each_persona_samples_as_set_for_it(rig: Rig, server_state: ServerState) -> None:
    await scene(rig, "haruhi", "atri")
    server_state.reply = lambda body: "ok"
    await rig.command("channel sampling", {"temperature": 0.5}, permissions=ADMIN)
    await rig.command(
        "scene sampling", {"persona": "atri", "temperature": 1.25, "seed": 3}, permissions=ADMIN
    )
    assert "**ATRI** (`atri`) samples here with temperature=1.25" in rig.last_response()
    await rig.say("ATRI and 凉宫春日?")
    by_persona = {speaking(b): b for b in server_state.requests[-2:]}
    assert (by_persona["ATRI"]["temperature"], by_persona["ATRI"]["seed"]) == (1.25, 3)
    assert by_persona["凉宫春日"]["temperature"] == 0.5 and "seed" not in by_persona["凉宫春日"]
    await rig.command("scene sampling", {"persona": "atri", "reset": True}, permissions=ADMIN)
    await rig.say("ATRI?")
    assert server_state.requests[-1]["temperature"] == 0.5


async def test_leaving_the_scene_and_back_to_one_persona(
    rig: Rig, server_state: ServerState
) -> None:
    await rig.command("persona set", {"name": "haruhi"})
    await rig.say(f"{rig.mention()} hello")
    await rig.command("scene add", {"persona": "atri"}, permissions=ADMIN)
    assert await rig.memory.cast(rig.key) == ("haruhi", "atri")
    # the one persona's history is the scene's from then on
    server_state.reply = lambda body: "fine"
    await rig.say("ATRI, did you hear that?")
    sent = server_state.requests[-1]["messages"]
    assert {"role": "user", "content": "alice_0_nick: hello"} in sent
    await rig.command("scene remove", {"persona": "haruhi"}, permissions=ADMIN)
    assert "left this channel" in rig.last_response()
    assert await rig.memory.cast(rig.key) == ("atri",)
    # one persona again: mentions only, ATRI's own turns
    await rig.say("haruhi? atri?")
    assert len(server_state.requests) == 2  # a name is no trigger in a one-persona channel
    await rig.say(f"{rig.mention()} just you now")
    sent = server_state.requests[-1]["messages"]
    assert "Write only" not in sent[0]["content"]
    assert all("凉宫春日" not in m["content"] for m in sent[1:])
    await rig.command("scene remove", {"persona": "haruhi"}, permissions=ADMIN)
    assert "not in this channel's scene" in rig.last_response()


async def test_approval_export_and_forget_me_per_persona(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri")
    server_state.reply = by_name(
        {"凉宫春日": "ATRI, fetch the camera!", "ATRI": "Yes! The camera is on its way."}
    )
    await rig.say("凉宫春日, what is the plan? marker-7731")
    atri = next(p for p in reversed(rig.api.posts_in(rig.channel.id)) if p.username == "ATRI")
    message = rig.bot._connection._get_message(atri.message_id)
    assert message is not None
    react(message, rig.bob, "👍")
    await dpytest.run_all_events()
    turn = await rig.memory.turn_by_message(str(atri.message_id))
    assert turn is not None and turn.persona == "atri"
    dialogue = await rig.memory.dialogue_for_turn(turn.id)
    assert dialogue is not None and dialogue.persona == "atri"
    # the approved persona's own replies stay its own; 凉宫春日's are named turns
    roles = [(m["role"], m.get("persona")) for m in dialogue.messages]
    assert ("user", "haruhi") in roles and roles[-1] == ("assistant", None)

    await rig.command("export", {"persona": "atri"}, permissions=ADMIN)
    files = next(r.files for r in reversed(rig.api.responses) if r.files)
    (row,) = read_jsonl(files["atri.jsonl"])
    turns = row["conversations"]
    assert turns[0]["from"] == "system" and turns[0]["value"].endswith(scene_note("ATRI"))
    assert turns[-1] == {"from": "gpt", "value": "Yes! The camera is on its way."}
    human = turns[-2]
    assert human["from"] == "human"
    assert human["value"].endswith(
        "alice_0_nick: 凉宫春日, what is the plan? marker-7731\n凉宫春日:\nATRI, fetch the camera!"
    )
    # 凉宫春日 has no approved dialogue: nothing of ATRI's reply trains it
    assert await rig.memory.count_dialogues("haruhi") == 0

    # forget-me: alice's message, and both personas' replies written for it, are gone
    await rig.command("memory forget-me")
    assert "2 persona replies that answered or quoted you" in rig.last_response()
    assert await rig.memory.dialogue_for_turn(turn.id) is None
    left = await stored(rig, "haruhi", "atri")
    assert all("marker-7731" not in c and "camera" not in c for _, _, c in left)


async def test_without_webhooks_each_persona_still_speaks_under_its_name(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri")
    server_state.reply = by_name({"ATRI": "plain but named", "凉宫春日": "me too"})
    rig.api.hooks.clear()  # the webhook was deleted, and a new one is refused
    rig.api.refuse_webhooks = True
    rig.bot.webhooks.forget(rig.channel)
    await rig.say("ATRI, 凉宫春日?")
    assert channel_texts(rig.channel, rig.bot.user)[-2:] == [
        "**ATRI**\nplain but named",
        "**凉宫春日**\nme too",
    ]


async def test_each_persona_keeps_its_own_summary_of_the_shared_history(
    rig: Rig, server_state: ServerState
) -> None:
    await scene(rig, "haruhi", "atri")
    # a small budget: 2048 context - 1900 reply tokens leaves ~145 tokens of history
    await rig.memory.set_channel_sampling(rig.key, {"max_tokens": 1900})

    def reply(body: dict[str, Any]) -> str:
        if "keep the memory" in body["messages"][0]["content"]:
            return "summary of what was said"
        return f"{speaking(body)} remembers the blue door"

    server_state.reply = reply
    for i in range(6):
        who = "ATRI" if i % 2 else "凉宫春日"
        await rig.say(f"{who}, message {i} about the blue door in the old club room")
    asks = [r for r in server_state.requests if "keep the memory" in r["messages"][0]["content"]]
    assert asks
    # the transcript names each speaker: the member, and each persona by its own name
    transcript = "\n".join(a["messages"][1]["content"] for a in asks)
    assert "alice_0_nick: 凉宫春日, message 0" in transcript
    assert "ATRI: 夏生先生" in transcript  # ATRI's greeting, under ATRI's name
    for key in ("haruhi", "atri"):
        summary = await rig.memory.summary(rig.key, key)
        assert summary is not None and summary.content == "summary of what was said"
    await rig.say("ATRI, what do you remember?")
    chats = [
        r for r in server_state.requests if "keep the memory" not in r["messages"][0]["content"]
    ]
    system = chats[-1]["messages"][0]["content"]
    assert "Summary of the conversation so far:" in system
    await rig.command("memory show")
    shown = "\n".join(rig.api.texts()[-2:])
    assert "The scene here (**凉宫春日**, **ATRI**) remembers" in shown
    assert "as ATRI remembers them" in shown and "as 凉宫春日 remembers them" in shown


async def test_adds_at_the_same_time_each_report_what_happened(
    rig: Rig, server_state: ServerState
) -> None:
    def answers() -> list[str]:
        said = [r.content or "" for r in rig.api.responses]
        rig.api.responses.clear()
        return said

    async def add_together(*keys: str) -> list[str]:
        await asyncio.gather(
            *(rig.command("scene add", {"persona": key}, permissions=ADMIN) for key in keys)
        )
        return answers()

    # an empty channel: both join, and both are in the cast
    said = await add_together("haruhi", "atri")
    assert sum("joined this channel" in s for s in said) == 2, said
    assert sorted(await rig.memory.cast(rig.key)) == ["atri", "haruhi"]
    # the same persona twice: it joins once
    said = await add_together("xin", "xin")
    assert sum("joined this channel" in s for s in said) == 1, said
    assert sum("is here already" in s for s in said) == 1, said
    # one seat left: one joins, the other is refused, and the cast holds its most
    for number in range(1, 7):
        card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": f"P{number}"}}
        rig.bot.personas.add(f"p{number}", parse_card(json.dumps(card).encode()))
    for key in ("p1", "p2", "p3", "p4"):
        await rig.command("scene add", {"persona": key}, permissions=ADMIN)
    answers()
    said = await add_together("p5", "p6")
    assert sum("joined this channel" in s for s in said) == 1, said
    assert sum("the most it can have" in s for s in said) == 1, said
    assert len(await rig.memory.cast(rig.key)) == MAX_CAST
