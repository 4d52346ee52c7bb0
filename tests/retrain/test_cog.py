"""/retrain, /adapters and /rollback through the Discord adapter (dpytest gateway, real
interaction payloads, real SQLite): admin checks at run time, one job per persona, the status
message edited to the job's end."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from bot.core.approvals import Approvals
from bot.core.cards import Card
from bot.core.memory import Memory
from bot.core.personas import Persona
from bot.discord.cogs.retrain.commands import RetrainCommands
from tests.discord import conftest as discord_fixtures
from tests.discord.conftest import ADMIN, Rig
from tests.retrain.conftest import shared_dialogues

# the Discord adapter's rig: a real bot on dpytest, real SQLite, the instant model server
instant = discord_fixtures.instant
server_state = discord_fixtures.server_state
rig = discord_fixtures.rig


def server_persona(rig: Rig, guild: str | None = None, name: str = "凉宫春日") -> Persona:
    """A card this server imported (`knight`): what a server may retrain (a shared persona is
    the operator's)."""
    card = Card.model_validate(
        {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name}}
    )
    return rig.bot.personas.add("knight", card, guild_id=guild or str(rig.guild.id))


async def approve(
    memory: Memory, persona: str, pairs: list[tuple[str, str]], *, guild: str, channel: str
) -> None:
    """Members chat with `persona` in a channel of `guild` and an admin approves each reply."""
    key = f"discord:{channel}"
    await memory.set_persona(key, persona)
    await memory.set_channel_guild(key, guild)
    approvals = Approvals(memory, context_turns=2)
    for i, (user_text, reply) in enumerate(pairs):
        await memory.add_turn(
            key, persona=persona, role="user", content=user_text,
            author_id=f"10{i % 3}", author_name=f"member{i % 3}",
        )  # fmt: skip
        turn = await memory.add_turn(key, persona=persona, role="assistant", content=reply)
        await approvals.approve(turn, by="admin", guild_id=guild)


def cog(rig: Rig) -> RetrainCommands:
    found = rig.bot.get_cog("RetrainCommands")  # loaded as an extension: its own module copy
    assert type(found).__name__ == "RetrainCommands"
    return cast(RetrainCommands, found)


async def test_retrain_is_for_admins(rig: Rig) -> None:
    await rig.command("retrain", {"persona": "haruhi"}, member=rig.bob)
    assert "for admins" in rig.last_response()
    assert await cog(rig).service.store.recent() == []


async def test_retrain_reports_in_its_status_message(rig: Rig, data_dir: Path) -> None:
    mine = server_persona(rig)
    theirs = server_persona(rig, guild="4242")  # the same key in another server: not this one
    guild = str(rig.guild.id)
    await approve(rig.memory, mine.key, shared_dialogues(data_dir, 2), guild=guild, channel="c1")
    await approve(rig.memory, theirs.key, shared_dialogues(data_dir, 4), guild="4242", channel="x")
    await rig.command("retrain", {"persona": "knight", "min_approved": 5}, permissions=ADMIN)
    assert "Started job #1 for 凉宫春日" in rig.last_response()
    job = await cog(rig).service.wait(1)
    assert job.state == "rejected" and job.channel_id == str(rig.channel.id)
    assert job.persona == mine.key and job.guild_id == guild
    status = await rig.channel.fetch_message(int(job.message_id or 0))
    assert status.embeds and status.embeds[0].title == "Retrain 凉宫春日 · job #1"
    assert status.embeds[0].description == (
        "凉宫春日 has 2 approved dialogues in this server; a retrain needs 5: approve 3 more."
    )
    assert [f.value for f in status.embeds[0].fields if f.name == "State"] == ["rejected"]


async def test_a_second_request_says_which_job_runs(rig: Rig) -> None:
    mine = server_persona(rig)
    active = await cog(rig).service.store.create(mine.key, min_approved=5, requested_by="1")
    await rig.command("retrain", {"persona": "knight"}, permissions=ADMIN)
    assert rig.last_response().startswith(f"job #{active.id} for {mine.key} is queued since ")


async def test_a_shared_persona_is_the_operators_to_retrain(rig: Rig) -> None:
    for command in ("retrain", "rollback"):
        await rig.command(command, {"persona": "atri"}, permissions=ADMIN)
        assert "is shared by every server this bot is in" in rig.last_response()
    assert await cog(rig).service.store.recent() == []


async def test_adapters_and_rollback_without_versions(rig: Rig) -> None:
    mine = server_persona(rig)
    await rig.command("adapters", {"persona": "haruhi"}, member=rig.bob)
    assert "for admins" in rig.last_response()
    await rig.command("adapters", {"persona": "haruhi"}, permissions=ADMIN)
    assert "no adapter yet" in rig.last_response()
    await rig.command("rollback", {"persona": "knight"}, member=rig.bob)
    assert "for admins" in rig.last_response()
    await rig.command("rollback", {"persona": "knight"}, permissions=ADMIN)
    assert f"{mine.key} has no published adapter" in rig.last_response()
