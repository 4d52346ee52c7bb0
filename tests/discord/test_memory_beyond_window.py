"""Memory beyond the window: rolling summaries and card lorebooks, through the Discord bot."""

from __future__ import annotations

from bot.core.cards import Card
from bot.core.prompt import turn_message
from tests.discord.conftest import Rig
from tests.instant_server import ServerState


async def test_old_turns_are_summarised_into_the_prompt(rig: Rig, server_state: ServerState):
    await rig.command("persona set", {"name": "haruhi"})
    # A small budget: 2048 context - 1900 reply tokens leaves ~145 tokens of history.
    await rig.memory.set_channel_sampling(rig.key, {"max_tokens": 1900})
    for i in range(8):
        await rig.say(f"{rig.mention()} message {i} about the blue door in the old club room")
    summary = await rig.memory.summary(rig.key, "haruhi")
    assert summary is not None and summary.content
    oldest = await rig.memory.recent_turns(rig.key, "haruhi", limit=100)
    assert summary.through_id >= min(t.id for t in oldest)
    # A summary request went to the base model with the old lines as a transcript.
    asks = [r for r in server_state.requests if "keep the memory" in r["messages"][0]["content"]]
    assert any("message 0" in ask["messages"][1]["content"] for ask in asks)

    await rig.say(f"{rig.mention()} what do you remember?")
    chats = [
        r for r in server_state.requests if "keep the memory" not in r["messages"][0]["content"]
    ]
    system = chats[-1]["messages"][0]["content"]
    assert "Summary of the conversation so far:" in system
    # The prompt carries only turns newer than what the summary covers.
    latest = await rig.memory.summary(rig.key, "haruhi")
    assert latest is not None
    # (Compared as whole messages: the instant server's replies quote the user turn before.)
    covered = [
        turn_message(t, speaker_names=True)
        for t in await rig.memory.recent_turns(rig.key, "haruhi", limit=100)
        if t.id <= latest.through_id
    ]
    assert covered
    assert not any(m in covered for m in chats[-1]["messages"][1:])

    await rig.command("memory show")
    assert "Summary of earlier turns" in "\n".join(rig.api.texts()[-2:])


async def test_lorebook_entries_enter_when_their_keys_appear(
    rig: Rig, server_state: ServerState, tmp_path
):
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Archivist",
            "description": "Keeper of the archive.",
            "character_book": {
                "token_budget": 60,
                "entries": [
                    {
                        "keys": ["blue door"],
                        "content": "The blue door leads to the archive.",
                        "insertion_order": 2,
                    },
                    {
                        "keys": ["Castle"],
                        "content": "The castle fell in winter.",
                        "case_sensitive": True,
                    },
                    {
                        "keys": ["anything"],
                        "content": "always known fact",
                        "constant": True,
                        "insertion_order": 1,
                    },
                    {"keys": ["blue door"], "content": " ".join(["long"] * 200), "priority": -1},
                ],
            },
        },
    }
    rig.bot.personas.add("archivist", Card.model_validate(card))
    await rig.memory.set_persona(rig.key, "archivist")

    await rig.say(f"{rig.mention()} hello")
    system = server_state.requests[-1]["messages"][0]["content"]
    assert "always known fact" in system
    assert "blue door leads" not in system

    await rig.say(f"{rig.mention()} where does the Blue Door go? the castle?")
    system = server_state.requests[-1]["messages"][0]["content"]
    assert (
        "Background knowledge:\n- always known fact\n- The blue door leads to the archive."
        in system
    )
    assert "castle fell" not in system  # case-sensitive key
    assert "long long" not in system  # over the lorebook's token budget
    roles = [m["role"] for m in server_state.requests[-1]["messages"]]
    assert roles.count("system") == 1  # card, summary and lore share one system message
