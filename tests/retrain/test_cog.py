"""/retrain, /adapters and /rollback through the Discord adapter (dpytest gateway, real
interaction payloads, real SQLite): admin checks at run time, one job per persona, the status
message edited to the job's end."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from bot.discord.cogs.retrain.commands import RetrainCommands
from tests.discord import conftest as discord_fixtures
from tests.discord.conftest import ADMIN, Rig
from tests.retrain.conftest import approve, shared_dialogues

# the Discord adapter's rig: a real bot on dpytest, real SQLite, the instant model server
instant = discord_fixtures.instant
server_state = discord_fixtures.server_state
rig = discord_fixtures.rig


def cog(rig: Rig) -> RetrainCommands:
    found = rig.bot.get_cog("RetrainCommands")  # loaded as an extension: its own module copy
    assert type(found).__name__ == "RetrainCommands"
    return cast(RetrainCommands, found)


async def test_retrain_is_for_admins(rig: Rig) -> None:
    await rig.command("retrain", {"persona": "haruhi"}, member=rig.bob)
    assert "for admins" in rig.last_response()
    assert await cog(rig).service.store.recent() == []


async def test_retrain_reports_in_its_status_message(rig: Rig, data_dir: Path) -> None:
    await approve(rig.memory, shared_dialogues(data_dir, 2), guild=str(rig.guild.id))
    await approve(rig.memory, shared_dialogues(data_dir, 4), guild="another-guild", channel="x")
    await rig.command("retrain", {"persona": "haruhi", "min_approved": 5}, permissions=ADMIN)
    assert "Started job #1 for 凉宫春日" in rig.last_response()
    job = await cog(rig).service.wait(1)
    assert job.state == "rejected" and job.channel_id == str(rig.channel.id)
    status = await rig.channel.fetch_message(int(job.message_id or 0))
    assert status.embeds and status.embeds[0].title == "Retrain 凉宫春日 · job #1"
    assert status.embeds[0].description == (
        "凉宫春日 has 2 approved dialogues in this server; a retrain needs 5: approve 3 more."
    )
    assert [f.value for f in status.embeds[0].fields if f.name == "State"] == ["rejected"]


async def test_a_second_request_says_which_job_runs(rig: Rig) -> None:
    active = await cog(rig).service.store.create("atri", min_approved=5, requested_by="1")
    await rig.command("retrain", {"persona": "atri"}, permissions=ADMIN)
    assert rig.last_response().startswith(f"job #{active.id} for atri is queued since ")


async def test_adapters_and_rollback_without_versions(rig: Rig) -> None:
    await rig.command("adapters", {"persona": "haruhi"}, member=rig.bob)
    assert "no adapter yet" in rig.last_response()
    await rig.command("rollback", {"persona": "haruhi"}, member=rig.bob)
    assert "for admins" in rig.last_response()
    await rig.command("rollback", {"persona": "haruhi"}, permissions=ADMIN)
    assert "haruhi has no published adapter" in rig.last_response()
