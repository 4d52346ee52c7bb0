"""forget-me leaves nothing of what the member wrote, nor their id: a unique marker they wrote
is searched for, after `/memory forget-me`, in the bytes of the database file and its
write-ahead log, and in every file of the retrain job directories (the export of approved
dialogues, the cleaned and split data, predictions); it was in each before. Everything of the
other members that did not hold the marker stays."""

from __future__ import annotations

import json
from pathlib import Path

import discord.ext.test as dpytest
import pytest

from bot.core.memory import Memory, Summary, Turn
from bot.core.personas import PersonaRegistry
from bot.core.quotes import Quotes
from bot.errors import ConversationGoneError
from bot.retrain.runner import RetrainService
from bot.settings import BotSettings
from tests.discord import conftest as discord_fixtures
from tests.discord.conftest import Rig
from tests.discord.fakediscord import invoke, message_command_data, react
from tests.instant_server import ServerState

instant = discord_fixtures.instant
server_state = discord_fixtures.server_state
rig = discord_fixtures.rig

MARKER = "zebra-quokka-7f3a9c-marker"


def database_bytes(path: Path) -> bytes:
    """The database file and whatever sits beside it (-wal, -shm, -journal)."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())


def files_holding(folder: Path, needle: bytes) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    )


async def approve(rig: Rig, message_id: int, member: object) -> None:
    message = rig.bot._connection._get_message(message_id)
    assert message is not None
    await invoke(
        rig.bot, rig.channel, member, message_command_data(message, "Approve for training")
    )  # type: ignore[arg-type]


async def test_forget_me_leaves_no_trace_in_the_database_files_and_job_directories(
    rig: Rig, server_state: ServerState, tmp_path: Path
) -> None:
    bob, alice = rig.bob, rig.alice
    mention = rig.mention()
    await rig.command("persona set", {"name": "haruhi"})
    # bob's words; the instant server's reply quotes them ("you said: ...")
    await rig.say(f"{mention} my secret is {MARKER} and nobody may know it", bob)
    await rig.say(f"{mention} alice here: the club room is ours today", alice)
    await rig.say(f"{mention} is user {bob.id} in the computer society, do you think", alice)
    await rig.say(f"{mention} alice again, tell me about the summer festival plans", alice)
    posts = rig.api.posts_in(rig.channel.id)  # greeting, then one reply per message
    assert MARKER in posts[1].content
    await approve(rig, posts[1].message_id, alice)  # quotes bob's words
    await approve(rig, posts[2].message_id, alice)  # bob's turn is in its context
    await approve(rig, posts[4].message_id, bob)  # approved by bob
    reply = rig.bot._connection._get_message(posts[3].message_id)
    assert reply is not None
    react(reply, bob, "👍")
    await dpytest.run_all_events()

    # a retrain job asked for by bob: its export holds his words, cleaning and splitting
    # copy them into data/; training is told to fail at once (the files stay)
    settings = BotSettings(
        home=rig.home,
        server_url="http://127.0.0.1:9",
        retrain={  # type: ignore[arg-type]
            "base": "",
            "min_approved": 2,
            "validation": 0.5,
            "max_attempts": 1,
            "launch": "{python} -m rolecast train --no-such-flag",
        },
    )
    service = RetrainService(
        rig.memory, PersonaRegistry(settings.user_personas).load(), settings, server_url=None
    )
    job = await service.start(
        "haruhi", requested_by=str(bob.id), guild_id=str(rig.guild.id), min_approved=2
    )
    job = await service.wait(job.id)
    assert job.state == "failed" and job.workdir is not None
    workdir = Path(job.workdir)
    # a copy the operator made beside the job's files, as evaluation writes predictions
    clean = service.paths(job).clean.read_text(encoding="utf-8").splitlines()
    predictions = workdir / "eval" / "predictions.jsonl"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text(
        "".join(
            json.dumps({"id": json.loads(line)["id"], "prompt": line[-200:]}) + "\n"
            for line in clean
        ),
        encoding="utf-8",
    )

    needle, bob_id = MARKER.encode(), str(bob.id).encode()
    database = rig.home / "rolecast.db"
    assert needle in database_bytes(database) and bob_id in database_bytes(database)
    before = files_holding(workdir, needle)
    assert {"export/haruhi.jsonl", "data/haruhi.jsonl", "eval/predictions.jsonl"} <= set(before)
    kept_alice = (await rig.memory.count_turns(rig.key)) - 2  # bob's turn and its reply go

    await rig.command("memory forget-me", member=bob)
    said = rig.last_response()
    assert said.startswith(
        "Deleted 1 of your messages, 1 persona replies that answered or quoted you, "
        "4 approved training dialogues that held your words or your approval, 1 of your "
        "ratings, your id from 2 other messages that mentioned you, your name from 1 retrain "
        "requests and "
    ), said
    assert "rows from" in said and "training files on disk in this server." in said

    # nothing of bob's words, nor his id, in the database's bytes (file and log) or on disk
    assert needle not in database_bytes(database)
    assert bob_id not in database_bytes(database)
    assert files_holding(workdir, needle) == []
    assert files_holding(rig.home, needle) == []
    # the other members' words are kept: alice's turns, the dialogue that never held bob's
    assert await rig.memory.count_turns(rig.key) == kept_alice
    left = [t.content for t in await rig.memory.recent_turns(rig.key, "haruhi", limit=50)]
    assert any("summer festival" in t for t in left)
    assert any("is user @someone in the computer" in t for t in left)  # his id, redacted
    assert (await service.store.get(job.id)).requested_by is None


async def test_forget_me_is_per_server_and_compacts_the_database(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "r.db") as memory:
        for guild, channel in (("1", "discord:10"), ("2", "discord:20")):
            await memory.set_persona(channel, "haruhi")
            await memory.set_channel_guild(channel, guild)
            # long enough to spill over several pages
            await memory.add_turn(channel, persona="haruhi", role="user",
                                  content=f"secret-of-guild-{guild} " * 300,
                                  author_id="42", author_name="bob")  # fmt: skip
        gone = await memory.forget_author("1", "42")
        assert gone.turns == 1 and await memory.count_turns("discord:20") == 1
        assert await memory.compact()
        raw = database_bytes(tmp_path / "r.db")
        assert b"secret-of-guild-1" not in raw and b"secret-of-guild-2" in raw
        assert (tmp_path / "r.db-wal").stat().st_size == 0


# what a member said, and the summary written from it
BOBS_SECRET = (f"my secret is {MARKER}", f"Bob's secret is {MARKER}.")


async def said_and_summarised(
    memory: Memory, channel: str, texts: tuple[str, str], author_id: str, author_name: str
) -> tuple[Turn, Summary]:
    """A member's message in `channel` (of guild 1) and a summary written through it."""
    message, summary = texts
    await memory.set_channel_guild(channel, "1")
    said = await memory.add_turn(channel, persona="haruhi", role="user", content=message,
                                 author_id=author_id, author_name=author_name)  # fmt: skip
    return said, await memory.set_summary(channel, "haruhi", summary, through_id=said.id)


async def test_forget_me_drops_the_summaries_built_from_the_members_words(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "r.db") as memory:
        channel = "discord:10"
        await said_and_summarised(memory, channel, BOBS_SECRET, "42", "bob")
        # someone who wrote nothing here: the summary holds none of their words and stays
        await memory.forget_author("1", "43")
        assert await memory.summary(channel, "haruhi") is not None
        await memory.forget_author("1", "42")
        assert await memory.summary(channel, "haruhi") is None


async def test_forget_me_drops_summaries_of_turns_that_only_named_the_member(
    tmp_path: Path,
) -> None:
    """A member who wrote nothing but whose id another member typed: the id is redacted from
    that turn, and a summary written from it, which may repeat the id, goes too."""
    async with Memory.open(tmp_path / "r.db") as memory:
        channel = "discord:10"
        said, _ = await said_and_summarised(
            memory,
            channel,
            ("ask 4242 about the club room", "Alice wants 4242 asked about the club room."),
            "43",
            "alice",
        )
        gone = await memory.forget_author("1", "4242")
        assert gone.turns == 0 and gone.mentions == 1
        turn = await memory.turn(said.id)
        assert turn is not None and "4242" not in turn.content
        assert await memory.summary(channel, "haruhi") is None


async def test_a_summary_that_extends_one_forget_me_dropped_is_not_stored(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "r.db") as memory:
        channel = "discord:10"
        _, previous = await said_and_summarised(memory, channel, BOBS_SECRET, "42", "bob")
        later = await memory.add_turn(channel, persona="haruhi", role="user",
                                      content="the club room is ours",
                                      author_id="43", author_name="alice")  # fmt: skip
        # the next summary folds alice's turn into bob's summary; bob is forgotten meanwhile
        await memory.forget_author("1", "42")
        assert await memory.turn(later.id) is not None  # the turn it covers is still there
        with pytest.raises(ConversationGoneError):
            await memory.set_summary(
                channel,
                "haruhi",
                f"Bob's secret is {MARKER}; alice claims the club room.",
                through_id=later.id,
                covers=[later.id],
                extends=previous,
            )
        assert await memory.summary(channel, "haruhi") is None


@pytest.mark.parametrize(
    "text, quoted",
    [
        ("Alice said: MY SECRET IS zebra-quokka and more", True),
        ("my secret, you say", False),  # a phrase shorter than a quote
        ("the club room\u200d is ours, said someone", True),
        ("她说我今天要去SOS团的活动室开会了", True),
        ("今天要去", False),
    ],
)
def test_what_counts_as_a_quote(text: str, quoted: bool) -> None:
    quotes = Quotes(
        ["my secret is zebra-quokka", "the club room is ours", "我今天要去SOS团的活动室"]
    )
    assert quotes.found_in(text) == quoted


def test_scrub_files_by_row_id_and_by_quote(tmp_path: Path) -> None:
    from bot.core.forget import scrub_files

    job = tmp_path / "haruhi-3"
    (job / "data").mkdir(parents=True)
    rows = [
        {"id": "haruhi_1", "conversations": [{"from": "human", "value": "bob: hello"}]},
        {"id": "haruhi_2", "conversations": [{"from": "human", "value": "alice: hi"}]},
        {"id": "haruhi_9", "conversations": [{"from": "gpt", "value": f"I recall {MARKER}!"}]},
    ]
    (job / "data" / "haruhi.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows), encoding="utf-8"
    )
    (job / "steps.log").write_text(f"ok\nrow haruhi_9: {MARKER.upper()}\nok\n")
    (job / "report.json").write_text(json.dumps({"sample": MARKER}, indent=2))
    (job / "metrics.json").write_text(json.dumps({"bleu-4": 1.0}))
    files, removed = scrub_files([tmp_path], frozenset({"haruhi_1"}), [f"my note: {MARKER}"])
    assert (files, removed) == (3, 4)
    left = (job / "data" / "haruhi.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in left] == ["haruhi_2"]
    assert (job / "steps.log").read_text() == "ok\nok\n"
    assert not (job / "report.json").exists()  # one JSON document: removed whole
    assert (job / "metrics.json").exists()
    assert files_holding(tmp_path, MARKER.encode()) == []
