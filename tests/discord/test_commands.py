"""Slash commands, the message command and reactions, with interactions built from payloads
shaped like Discord's. Real SQLite, the instant model server over loopback HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import discord
import discord.ext.test as dpytest

from bot.core.cards import Card, card_to_png
from tests.discord.conftest import ADMIN, Rig, read_jsonl
from tests.discord.fakediscord import (
    find_button,
    invoke,
    message_command_data,
    press,
    react,
    slash_data,
    snowflake,
)
from tests.instant_server import ServerState


def attachment(path: Path) -> tuple[str, dict[str, object]]:
    ident = str(snowflake())
    return ident, {
        "attachments": {
            ident: {
                "id": ident,
                "filename": path.name,
                "size": path.stat().st_size,
                "url": path.as_uri(),
                "proxy_url": path.as_uri(),
                "content_type": "application/json",
            }
        }
    }


async def chat(rig: Rig, text: str, member: discord.Member | None = None) -> None:
    await rig.say(f"{rig.mention()} {text}", member)


def first_callback_types(rig: Rig) -> list[int | None]:
    return [r.type for r in rig.api.responses if r.kind == "callback"]


async def test_every_command_is_acknowledged_first(rig: Rig):
    await rig.command("persona set", {"name": "haruhi"})
    await rig.command("persona info", {"name": "haruhi"})
    await rig.command("memory show")
    await rig.command("status", permissions=ADMIN)
    # A deferral (5) or an immediate answer (4) comes before any slow work.
    assert first_callback_types(rig) == [5, 5, 5, 5]
    assert rig.api.responses[0].ephemeral


async def test_persona_list_and_info(rig: Rig):
    await rig.command("persona list")
    assert "`haruhi`" in rig.last_response() and "`atri`" in rig.last_response()
    await rig.command("persona info", {"name": "xin"})
    info = json.loads(rig.api.texts()[-1])
    assert info["title"] == "星锑 (xin)"
    served = {
        "name": "Served by",
        "value": "instant-base (the base model, no adapter)",
        "inline": True,
    }
    assert served in info["fields"]


async def test_autocomplete_offers_matching_personas(rig: Rig, monkeypatch):
    choices: list[object] = []
    original = rig.api._callback

    def capture(route, payload, files):  # type: ignore[no-untyped-def]
        if payload["type"] == 8:
            choices.extend(payload["data"]["choices"])
        return original(route, payload, files)

    monkeypatch.setattr(rig.api, "_callback", capture)
    data = slash_data(rig.bot.tree, "persona set", {"name": "宫"}, focused="name")
    await invoke(rig.bot, rig.channel, rig.alice, data, kind=4)
    assert choices == [{"name": "凉宫春日 (haruhi)", "value": "haruhi"}]


async def test_admin_commands_check_permissions_at_run_time(rig: Rig):
    # Discord's default permissions would hide these, but a server can override that.
    await rig.command("channel mode", {"mode": "always"})
    assert "for admins" in rig.last_response()
    assert (await rig.memory.channel_settings(rig.key)).mode == "mention"

    await rig.command("channel mode", {"mode": "always"}, permissions=ADMIN)
    assert (await rig.memory.channel_settings(rig.key)).mode == "always"

    # An admin role set per guild works without Manage Server.
    role = dpytest.backend.make_role("Keepers", rig.guild)
    await dpytest.add_role(rig.bob, role)
    await rig.command("admin role", {"role": str(role.id)}, member=rig.bob)
    assert "Manage Server" in rig.last_response()
    await rig.command(
        "admin role",
        {"role": str(role.id)},
        permissions=ADMIN,
        resolved={"roles": {str(role.id): dpytest.factories.dict_from_role(role)}},
    )
    await rig.command("channel mode", {"mode": "mention"}, member=rig.bob)
    assert (await rig.memory.channel_settings(rig.key)).mode == "mention"
    await rig.command("status", member=rig.alice)
    assert "for admins" in rig.last_response()


async def test_channel_sampling_reaches_the_model(rig: Rig, server_state: ServerState):
    await rig.command("persona set", {"name": "haruhi"})
    await rig.command(
        "channel sampling", {"temperature": 0.25, "max_tokens": 64, "seed": 7}, permissions=ADMIN
    )
    assert "temperature=0.25" in rig.last_response()
    await chat(rig, "hi")
    sent = server_state.requests[-1]
    assert (sent["temperature"], sent["max_tokens"], sent["seed"]) == (0.25, 64, 7)
    await rig.command("channel sampling", {"reset": True}, permissions=ADMIN)
    await chat(rig, "again")
    assert server_state.requests[-1]["temperature"] == 0.7


async def test_import_json_png_and_bad_cards_then_remove(rig: Rig, tmp_path: Path):
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Sir Reginald",
            "first_mes": "Hark, {{user}}!",
            "description": "A knight.",
        },
    }
    good = tmp_path / "knight.json"
    good.write_text(json.dumps(card))
    ident, resolved = attachment(good)
    await rig.command("persona import", {"card": ident}, permissions=ADMIN, resolved=resolved)
    assert "Imported **Sir Reginald** as `knight`" in rig.last_response()
    # the server's own persona, in the server's folder
    assert (rig.home / "personas" / "guilds" / str(rig.guild.id) / "knight.json").exists()

    png = tmp_path / "Lady Ada.png"
    card["data"]["name"] = "Lady Ada"  # type: ignore[index]
    png.write_bytes(card_to_png(Card.model_validate(card)))
    ident, resolved = attachment(png)
    await rig.command("persona import", {"card": ident}, permissions=ADMIN, resolved=resolved)
    assert "as `lady-ada`" in rig.last_response()

    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps({"spec": "chara_card_v9", "spec_version": "2.0", "data": {}}))
    ident, resolved = attachment(bad)
    await rig.command("persona import", {"card": ident}, permissions=ADMIN, resolved=resolved)
    reason = rig.last_response()
    assert "spec: expected one of chara_card_v2, chara_card_v3" in reason
    assert "data.name: required field is missing" in reason
    assert "broken" not in rig.bot.personas

    await rig.command("persona set", {"name": "knight"})
    assert rig.replies()[-1] == "Hark, alice_0_nick!"
    await rig.command("persona remove", {"name": "knight"}, permissions=ADMIN)
    assert "1 channel(s) no longer have a persona" in rig.last_response()
    assert "knight" not in rig.bot.personas
    await rig.command("persona remove", {"name": "haruhi"}, permissions=ADMIN)
    assert "shared by every server and cannot be removed from Discord" in rig.last_response()


async def test_memory_show_reset_with_confirmation(rig: Rig):
    await rig.command("persona set", {"name": "haruhi"})
    await chat(rig, "remember the blue door")
    await rig.command("memory show")
    shown = "\n".join(rig.api.texts()[-2:])
    assert "remembers 3 turns" in shown and "remember the blue door" in shown

    await rig.command("memory reset")
    question = rig.api.responses[-1]
    assert question.type == 4 and question.ephemeral and "Delete all 3 turns" in question.content
    # The view waits under the id Discord gave its message; find its "confirm" button.
    entity, confirm = find_button(rig.bot, "Delete the memory")
    await press(rig.bot, rig.channel, rig.bob, confirm, entity)  # not the caller: ignored
    await dpytest.run_all_events()
    assert await rig.memory.count_turns(rig.key) == 3
    await press(rig.bot, rig.channel, rig.alice, confirm, entity)
    await dpytest.run_all_events()
    assert "Forgot 3 turns" in rig.last_response()
    # Only the greeting is left, posted again.
    assert await rig.memory.count_turns(rig.key) == 1
    assert rig.replies()[-1].startswith("我对普通的人类")


async def test_approvals_reactions_export_and_forget_me(rig: Rig):
    await rig.command("persona set", {"name": "haruhi"})
    await chat(rig, f"<@{rig.bob.id}> says the club room is ours")
    await chat(rig, "what about the computer society?", rig.bob)
    posts = rig.api.posts_in(rig.channel.id)
    first_reply = rig.bot._connection._get_message(posts[1].message_id)
    second_reply = rig.bot._connection._get_message(posts[2].message_id)
    assert first_reply is not None and second_reply is not None

    # The message command approves one reply, with the turns before it.
    data = message_command_data(first_reply, "Approve for training")
    await invoke(rig.bot, rig.channel, rig.alice, data)
    assert "Approved for training" in rig.last_response()
    await invoke(
        rig.bot, rig.channel, rig.alice, message_command_data(first_reply, "Approve for training")
    )
    assert "Already approved" in rig.last_response()
    greeting = rig.bot._connection._get_message(posts[0].message_id)
    user_message = next(
        m for m in rig.bot.cached_messages if m.author == rig.alice and "club room" in m.content
    )
    await invoke(
        rig.bot, rig.channel, rig.alice, message_command_data(user_message, "Approve for training")
    )
    assert "not a persona reply" in rig.last_response()
    assert greeting is not None

    # Reactions: a thumbs-up approves, a thumbs-down from someone else withdraws it.
    react(second_reply, rig.alice, "👍")
    await dpytest.run_all_events()
    turn = await rig.memory.turn_by_message(str(second_reply.id))
    assert turn is not None and await rig.memory.dialogue_for_turn(turn.id) is not None
    react(second_reply, rig.bob, "👎")
    await dpytest.run_all_events()
    assert await rig.memory.dialogue_for_turn(turn.id) is None
    react(second_reply, rig.bob, "👎", remove=True)
    await dpytest.run_all_events()
    assert await rig.memory.dialogue_for_turn(turn.id) is not None
    assert await rig.memory.count_dialogues("haruhi") == 2

    # Export: ShareGPT JSONL + dataset_info.json, mentions and ids replaced by names.
    await rig.command("export", {"persona": "haruhi"}, permissions=ADMIN)
    files = rig.api.responses[-1].files
    assert set(files) == {"haruhi.jsonl", "dataset_info.json"}
    records = read_jsonl(files["haruhi.jsonl"])
    assert len(records) == 2
    convo = records[0]["conversations"]
    assert [c["from"] for c in convo] == ["system", "human", "gpt"]
    assert convo[1]["value"] == "alice_0_nick: @bob_1_nick says the club room is ours"
    raw = files["haruhi.jsonl"].decode()
    assert str(rig.bob.id) not in raw and str(rig.alice.id) not in raw
    assert [c["from"] for c in records[1]["conversations"]] == [
        "system",
        "human",
        "gpt",
        "human",
        "gpt",
    ]
    info = json.loads(files["dataset_info.json"])
    assert info["rolecast_haruhi"]["file_name"] == "haruhi.jsonl"
    assert info["rolecast_haruhi"]["formatting"] == "sharegpt"

    # forget-me: bob's turns, ratings and the dialogues he took part in are gone.
    await rig.command("memory forget-me", member=rig.bob)
    assert rig.last_response().startswith(
        "Deleted 1 of your messages, 1 persona replies that answered or quoted you, "
        "1 approved training dialogues that held your words or your approval"
    )
    left = await rig.memory.recent_turns(rig.key, "haruhi", limit=50)
    assert all(t.author_id != str(rig.bob.id) for t in left)
    assert await rig.memory.count_dialogues("haruhi") == 1


async def test_status_shows_health_adapters_and_queue(rig: Rig, server_state: ServerState):
    server_state.adapters = ["haruhi@v1", "haruhi@v2"]
    await rig.bot.client.models(refresh=True)
    await rig.command("status", permissions=ADMIN)
    embed = json.loads(rig.api.texts()[-1])
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Model server"].startswith("up")
    assert "`haruhi` → haruhi@v2 · 0 approved here" in fields["Personas"]
    assert "`atri` → instant-base" in fields["Personas"]
    assert fields["Queue"].startswith("0 replies")
