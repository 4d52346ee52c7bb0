"""Two Discord servers on one bot: every admin command is checked when it runs (not only by
Discord's default permissions) and refused in direct messages, and nothing one server's admin
does can replace, remove, reveal or retrain another server's personas, or change what another
server hears. Imported personas belong to the server that imported them; the shipped ones (and
the operator's) are shared and read-only from Discord."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest

from bot.core.approvals import Approvals
from bot.core.personas import GUILD_KEY, Persona
from bot.discord.cogs.retrain.commands import RetrainCommands
from bot.discord.permissions import _admin_predicate, _manage_server_predicate
from formats.registry import PERSONA_RE, AdapterRegistry
from tests.adapters import fake_lora
from tests.discord import conftest as discord_fixtures
from tests.discord.fakediscord import invoke, slash_data
from tests.discord.test_commands import attachment
from tests.hostile.two_guilds import Side, TwoGuilds, two_guilds
from tests.instant_server import InstantServer, ServerState

instant = discord_fixtures.instant
server_state = discord_fixtures.server_state


@pytest.fixture
async def two(
    tmp_path: Path,
    instant: InstantServer,
    server_state: ServerState,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[TwoGuilds]:
    async for rig in two_guilds(tmp_path, instant.base_url, monkeypatch):
        yield rig


def card_file(folder: Path, name: str, *, first_mes: str = "", stem: str = "knight") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": name, "first_mes": first_mes, "description": f"{name}'s card"}}  # fmt: skip
    path.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    return path


async def import_card(
    two: TwoGuilds, side: Side, name: str, *, key: str | None = None, replace: bool = False
) -> str:
    path = card_file(two.home / "uploads" / side.id / name.replace(" ", "-"), name)
    ident, resolved = attachment(path)
    options: dict[str, Any] = {"card": ident}
    if key is not None:
        options["key"] = key
    if replace:
        options["replace"] = True
    return await two.command(side, "persona import", options, resolved=resolved)


def owned(two: TwoGuilds, side: Side, key: str = "knight") -> Persona:
    return two.bot.personas.get(f"g{side.id}-{key}")


def retrain_cog(two: TwoGuilds) -> RetrainCommands:
    found = two.bot.get_cog("RetrainCommands")
    assert type(found).__name__ == "RetrainCommands"
    return found  # type: ignore[return-value]


async def chat_and_approve(two: TwoGuilds, side: Side, persona: str, text: str) -> None:
    """A member says `text` to the channel's persona (set to `persona`); the reply is approved."""
    await two.command(side, "persona set", {"name": persona})
    assert two.bot.user is not None
    await dpytest.message(f"<@{two.bot.user.id}> {text}", side.channel, side.member)
    turn = (await two.memory.recent_turns(side.key, owned_or_shared(two, side, persona), limit=1))[
        0
    ]
    assert turn.role == "assistant"
    await Approvals(two.memory).approve(turn, by=str(side.admin.id), guild_id=side.id)


def owned_or_shared(two: TwoGuilds, side: Side, name: str) -> str:
    return two.bot.personas.resolve(name, side.id).key


# -- every admin command: checked at run time, refused in direct messages --------------------


def role_option(side: Side) -> tuple[dict[str, Any], dict[str, Any]]:
    role = side.guild.roles[-1]
    return {"role": str(role.id)}, {"roles": {str(role.id): dpytest.factories.dict_from_role(role)}}


# What each admin command is called with in these tests: (options, resolved) from the side.
ADMIN_CALLS: dict[str, Callable[[TwoGuilds, Side], tuple[dict[str, Any], dict[str, Any]]]] = {
    "channel mode": lambda two, side: ({"mode": "always"}, {}),
    "channel sampling": lambda two, side: ({"temperature": 0.3}, {}),
    "admin role": lambda two, side: role_option(side),
    "export": lambda two, side: ({"persona": "knight"}, {}),
    "persona import": lambda two, side: (
        lambda ident, resolved: ({"card": ident, "replace": True}, resolved)
    )(*attachment(card_file(two.home / "probe", "Probe Knight"))),
    "persona remove": lambda two, side: ({"name": "knight"}, {}),
    "status": lambda two, side: ({}, {}),
    "retrain": lambda two, side: ({"persona": "knight"}, {}),
    "adapters": lambda two, side: ({"persona": "knight"}, {}),
    "rollback": lambda two, side: ({"persona": "knight"}, {}),
    "scene add": lambda two, side: ({"persona": "knight"}, {}),
    "scene remove": lambda two, side: ({"persona": "knight"}, {}),
    "scene turns": lambda two, side: ({"policy": "keywords", "chain_limit": 3}, {}),
    "scene sampling": lambda two, side: ({"persona": "knight", "temperature": 0.3}, {}),
}


def test_the_admin_commands_are_exactly_those_with_a_run_time_check(two: TwoGuilds) -> None:
    """Every command that Discord hides from members by default checks permission again when it
    runs, and each is in the table the tests below call: a new admin command without a
    run-time check, or without these tests, fails here."""
    checked, hidden = set(), set()
    for command in two.bot.tree.walk_commands():
        if isinstance(command, discord.app_commands.Group):
            continue
        name = command.qualified_name
        predicates = {getattr(c, "__qualname__", "") for c in command.checks}
        if predicates & {_admin_predicate.__qualname__, _manage_server_predicate.__qualname__}:
            checked.add(name)
        parent = command.parent
        if command.default_permissions or (parent is not None and parent.default_permissions):
            hidden.add(name)
    assert checked == hidden == set(ADMIN_CALLS)


@pytest.mark.parametrize("path", sorted(ADMIN_CALLS))
async def test_each_admin_command_refuses_members_and_direct_messages(
    path: str, two: TwoGuilds
) -> None:
    await import_card(two, two.a, "Sir A")
    before = await two.state()
    options, resolved = ADMIN_CALLS[path](two, two.a)
    said = await two.command(two.a, path, options, as_admin=False, resolved=resolved)
    assert "for admins" in said or "needs the Manage Server permission" in said, said
    assert await two.state() == before
    said = await two.direct(two.a.admin, path, options, resolved=resolved)
    assert said == "This command works in a server channel, not in direct messages."
    assert await two.state() == before
    # and another server's admin, in their own server, changes nothing of this one's
    said = await two.command(two.b, path, ADMIN_CALLS[path](two, two.b)[0], resolved=resolved)
    assert owned(two, two.a).name == "Sir A"
    assert two.a.id not in said


# -- personas belong to the server that imported them ----------------------------------------


async def test_the_same_key_in_two_servers_is_two_personas(two: TwoGuilds) -> None:
    assert "Imported **Sir A** as `knight`" in await import_card(two, two.a, "Sir A")
    assert "Imported **Sir B** as `knight`" in await import_card(two, two.b, "Sir B")
    mine, theirs = owned(two, two.a), owned(two, two.b)
    assert mine.key != theirs.key and (mine.name, theirs.name) == ("Sir A", "Sir B")
    for persona in (mine, theirs):
        # valid, distinct adapter registry names
        assert GUILD_KEY.match(persona.key) and PERSONA_RE.match(persona.key)
        AdapterRegistry(two.home / "adapters").check_writable(persona.key)

    # each server sees and uses its own
    assert "Sir A" in await two.command(two.a, "persona info", {"name": "knight"})
    assert "Sir B" in await two.command(two.b, "persona info", {"name": "knight"})
    listing = await two.command(two.b, "persona list", as_admin=False)
    assert "Sir B" in listing and "Sir A" not in listing and "凉宫春日" in listing
    await two.command(two.a, "persona set", {"name": "knight"}, as_admin=False)
    assert (await two.memory.channel(two.a.key)).persona == mine.key

    # another server's persona cannot be reached by its registry key either, and the error
    # names only what this server sees
    said = await two.command(two.a, "persona info", {"name": theirs.key}, as_admin=False)
    assert said == f"No persona named {theirs.key!r}. Known personas: atri, haruhi, knight, xin."

    # autocomplete offers what the server sees
    choices: list[dict[str, str]] = []
    original = two.api._callback

    def capture(route: Any, payload: dict[str, Any], files: Any) -> Any:
        if payload["type"] == 8:
            choices.extend(payload["data"]["choices"])
        return original(route, payload, files)

    two.api._callback = capture  # type: ignore[method-assign]
    data = slash_data(two.bot.tree, "persona set", {"name": "Sir"}, focused="name")
    await invoke(two.bot, two.b.channel, two.b.member, data, kind=4)
    assert choices == [{"name": "Sir B (knight)", "value": "knight"}]


async def test_an_import_never_replaces_another_servers_or_a_shared_persona(
    two: TwoGuilds,
) -> None:
    await import_card(two, two.a, "Sir A")
    await import_card(two, two.b, "Sir B")
    # the same key again in the same server: kept unless replace is asked for
    said = await import_card(two, two.a, "Sir A2")
    assert "'knight' is imported already (Sir A)" in said and "replace: True" in said
    assert "Replaced **Sir A2** as `knight`" in await import_card(
        two, two.a, "Sir A2", replace=True
    )
    assert (owned(two, two.a).name, owned(two, two.b).name) == ("Sir A2", "Sir B")
    # a shared key: refused, even with replace
    for replace in (False, True):
        said = await import_card(two, two.a, "Fake Haruhi", key="haruhi", replace=replace)
        assert "'haruhi' is a persona every server shares" in said
    assert two.bot.personas.get("haruhi").builtin
    said = await import_card(two, two.a, "Fake", key=f"g{two.b.id}-knight")
    assert "Sir B" not in said
    assert owned(two, two.b).name == "Sir B"


async def test_remove_touches_only_the_importing_servers_persona_and_channels(
    two: TwoGuilds,
) -> None:
    await import_card(two, two.a, "Sir A")
    await import_card(two, two.b, "Sir B")
    for side in (two.a, two.b):
        await two.command(side, "persona set", {"name": "knight"}, as_admin=False)
    said = await two.command(two.a, "persona remove", {"name": "knight"})
    assert "Removed **Sir A** (`knight`); 1 channel(s)" in said
    assert f"g{two.a.id}-knight" not in two.bot.personas
    assert owned(two, two.b).name == "Sir B" and owned(two, two.b).path.is_file()
    assert (await two.memory.channel(two.a.key)).persona is None
    assert (await two.memory.channel(two.b.key)).persona == owned(two, two.b).key
    # a shared persona is read-only from Discord
    said = await two.command(two.a, "persona remove", {"name": "haruhi"})
    assert "shared by every server and cannot be removed from Discord" in said
    said = await two.command(two.a, "persona remove", {"name": owned(two, two.b).key})
    assert "No persona named" in said and owned(two, two.b).path.is_file()


# -- each admin command, in two servers --------------------------------------------------------


async def test_channel_settings_and_the_admin_role_stay_in_their_server(two: TwoGuilds) -> None:
    await two.command(two.a, "channel mode", {"mode": "always"})
    await two.command(two.a, "channel sampling", {"temperature": 0.25, "seed": 3})
    b = await two.memory.channel_settings(two.b.key)
    assert (b.mode, b.sampling) == ("mention", None)
    a = await two.memory.channel_settings(two.a.key)
    assert (a.mode, a.sampling) == ("always", {"temperature": 0.25, "seed": 3})

    role = dpytest.backend.make_role("Keepers", two.a.guild)
    await dpytest.add_role(two.a.member, role)
    await two.command(
        two.a, "admin role", {"role": str(role.id)},
        resolved={"roles": {str(role.id): dpytest.factories.dict_from_role(role)}},
    )  # fmt: skip
    assert await two.memory.admin_role(two.a.id) == str(role.id)
    assert await two.memory.admin_role(two.b.id) is None
    # the role makes its holder an admin of its own server only
    said = await two.command(two.a, "status", member=two.a.member)
    assert "Rolecast status" in said
    said = await two.command(two.b, "status", member=two.b.member)
    assert "for admins" in said


async def test_export_and_status_count_only_this_server(
    two: TwoGuilds, server_state: ServerState
) -> None:
    await import_card(two, two.a, "Sir A")
    await import_card(two, two.b, "Sir B")
    await chat_and_approve(two, two.a, "haruhi", "alpha-secret-of-A")
    await chat_and_approve(two, two.b, "haruhi", "bravo-secret-of-B")
    await chat_and_approve(two, two.b, "haruhi", "bravo-second-of-B")
    await chat_and_approve(two, two.a, "knight", "alpha-knight-of-A")
    await chat_and_approve(two, two.b, "knight", "bravo-knight-of-B")

    await two.command(two.a, "export", {"persona": "haruhi"})
    raw = b"".join(two.files().values()).decode()
    assert "alpha-secret-of-A" in raw and "bravo" not in raw
    await two.command(two.a, "export", {"persona": "knight"})
    files = two.files()
    assert set(files) == {"knight.jsonl", "dataset_info.json"}
    raw = b"".join(files.values()).decode()
    assert "alpha-knight-of-A" in raw and "bravo" not in raw and "Sir B" not in raw
    assert two.b.id not in raw

    status = json.loads(await two.command(two.a, "status"))
    fields = {f["name"]: f["value"] for f in status["fields"]}
    assert "`haruhi` → instant-base · 1 approved here" in fields["Personas"]
    assert "`knight` → instant-base · 1 approved here" in fields["Personas"]
    assert (
        "Sir B" not in json.dumps(status, ensure_ascii=False) and two.b.id not in fields["Personas"]
    )
    job = await retrain_cog(two).service.store.create(
        owned(two, two.b).key, min_approved=5, requested_by=str(two.b.admin.id), guild_id=two.b.id
    )
    status = json.loads(await two.command(two.a, "status"))
    fields = {f["name"]: f["value"] for f in status["fields"]}
    assert fields["Retrain jobs"] == "none running"
    status = json.loads(await two.command(two.b, "status"))
    fields = {f["name"]: f["value"] for f in status["fields"]}
    assert fields["Retrain jobs"] == f"#{job.id} knight — queued"
    assert "`haruhi` → instant-base · 2 approved here" in fields["Personas"]


async def test_retrain_trains_only_the_servers_own_persona_on_its_own_dialogues(
    two: TwoGuilds,
) -> None:
    await import_card(two, two.a, "Sir A")
    await import_card(two, two.b, "Sir B")
    await chat_and_approve(two, two.a, "knight", "alpha-knight-of-A")
    for n in range(3):
        await chat_and_approve(two, two.b, "knight", f"bravo-knight-{n}")
    said = await two.command(two.a, "retrain", {"persona": "haruhi"})
    assert "shared by every server this bot is in, so a server cannot retrain it" in said
    said = await two.command(two.a, "retrain", {"persona": "knight", "min_approved": 2})
    assert "Started job #1 for Sir A" in said
    service = retrain_cog(two).service
    job = await service.wait(1)
    assert (job.persona, job.guild_id, job.state) == (owned(two, two.a).key, two.a.id, "rejected")
    # it counted server A's one dialogue, not B's three
    assert (
        job.reason
        == "Sir A has 1 approved dialogues in this server; a retrain needs 2: approve 1 more."
    )
    assert await service.store.active(owned(two, two.b).key) is None


async def test_adapters_and_rollback_see_and_move_only_the_servers_own_versions(
    two: TwoGuilds,
) -> None:
    await import_card(two, two.a, "Sir A")
    await import_card(two, two.b, "Sir B")
    registry = retrain_cog(two).service.registry
    theirs = owned(two, two.b).key
    for n in (1, 2):
        version = registry.add_version(theirs, fake_lora(two.home / f"b{n}"))
        registry.set_current(theirs, version.version)
    shared = registry.add_version("atri", fake_lora(two.home / "atri1"))
    registry.set_current("atri", shared.version)

    said = await two.command(two.a, "adapters", {"persona": "knight"})
    assert "Sir A has no adapter yet" in said and theirs not in said
    said = await two.command(two.b, "adapters", {"persona": "knight"})
    assert f"**live** `{theirs}@v2`" in said and f"`{theirs}@v1`" in said
    # a shared persona's versions may be looked at, not moved
    assert "**live** `atri@v1`" in await two.command(two.a, "adapters", {"persona": "atri"})
    said = await two.command(two.a, "rollback", {"persona": "atri"})
    assert "shared by every server this bot is in, so a server cannot roll back it" in said
    said = await two.command(two.a, "rollback", {"persona": "knight"})
    assert f"{owned(two, two.a).key} has no published adapter" in said
    said = await two.command(two.a, "rollback", {"persona": theirs})
    assert "No persona named" in said
    assert registry.current_served_name(theirs) == f"{theirs}@v2"
    assert registry.current_served_name("atri") == "atri@v1"
    # B's own rollback reaches its own persona (the instant server cannot load adapters, so
    # the rollback stops there and nothing moves: a real one is in tests/serving)
    said = await two.command(two.b, "rollback", {"persona": "knight"})
    assert f"refused to load {theirs}@v1" in said


async def test_a_channel_never_hears_another_servers_persona(two: TwoGuilds) -> None:
    await import_card(two, two.b, "Sir B")
    # a channel of A pointed at B's persona by hand (no command can do it): not heard
    await two.memory.set_persona(two.a.key, owned(two, two.b).key)
    assert two.bot.user is not None
    await dpytest.message(f"<@{two.bot.user.id}> hello", two.a.channel, two.a.member)
    assert two.api.posts_in(two.a.channel.id) == []
    assert await two.memory.recent_turns(two.a.key, owned(two, two.b).key, limit=5) == []


async def test_scenes_hold_only_what_their_server_sees(two: TwoGuilds) -> None:
    await import_card(two, two.a, "Sir A")
    await import_card(two, two.b, "Sir B")
    mine, theirs = owned(two, two.a), owned(two, two.b)
    for side, persona in ((two.a, "knight"), (two.a, "haruhi"), (two.b, "knight")):
        said = await two.command(side, "scene add", {"persona": persona})
        assert "joined this channel" in said
    assert await two.memory.cast(two.a.key) == (mine.key, "haruhi")
    assert (await two.memory.channel(two.b.key)).persona == theirs.key

    # another server's persona cannot join, by key or registry key; nothing changes
    before = await two.state()
    for name in (theirs.key, "Sir B"):
        said = await two.command(two.a, "scene add", {"persona": name})
        assert said == f"No persona named {name!r}. Known personas: atri, haruhi, knight, xin."
    assert await two.state() == before
    # members look and hand the turn on, within their own scene only
    said = await two.command(two.a, "scene list", as_admin=False)
    assert "Sir A" in said and "Sir B" not in said and theirs.key not in said
    said = await two.command(two.a, "scene next", {"persona": theirs.key}, as_admin=False)
    assert "not in this channel's scene" in said and "Sir B" not in said
    said = await two.command(two.a, "scene next", {"persona": "knight"}, as_admin=False)
    assert "**Sir A** (`knight`) answers the next message" in said
    assert (await two.memory.channel_settings(two.a.key)).next_persona == mine.key
    for path, options in (("scene list", {}), ("scene next", {"persona": "knight"})):
        said = await two.direct(two.a.member, path, options)
        assert said == "This command works in a server channel, not in direct messages."
    # the other server's admin changes nothing here, in their own channel
    await two.command(two.b, "scene remove", {"persona": "haruhi"})
    await two.command(two.b, "scene turns", {"chain_limit": 0})
    assert await two.memory.cast(two.a.key) == (mine.key, "haruhi")
    assert (await two.memory.channel_settings(two.a.key)).chain_limit == 2

    # a cast pointed at another server's persona by hand (no command can): it never speaks
    await two.memory.set_cast(two.a.key, [mine.key, theirs.key, "haruhi"])
    assert two.bot.user is not None
    await dpytest.message("Sir B and Sir A, hello", two.a.channel, two.a.member)
    names = [p.username for p in two.api.posts_in(two.a.channel.id)]
    assert "Sir B" not in names and names[-1] == "Sir A"
    assert await two.memory.recent_turns(two.a.key, theirs.key, limit=5) == []

    # removing a server's persona takes it out of that server's scenes only
    said = await two.command(two.a, "persona remove", {"name": "knight"})
    assert "Removed **Sir A**" in said
    assert await two.memory.cast(two.a.key) == (theirs.key, "haruhi")
    assert (await two.memory.channel(two.b.key)).persona == theirs.key
