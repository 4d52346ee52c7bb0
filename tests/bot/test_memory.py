"""SQLite memory: migrations, WAL, turns that survive a reopen, paging through long histories."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bot.core import sql
from bot.core.approvals import Approvals
from bot.core.memory import Dialogue, Erased, Memory, Turn
from bot.errors import ConversationGoneError, RolecastError


async def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with Memory.open(db) as memory:
        assert await memory.migrate() == []  # already applied on open
    with sqlite3.connect(db) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]
        assert names == [name for name, _ in sql.MIGRATIONS]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        plan = " ".join(
            str(r)
            for r in conn.execute("EXPLAIN QUERY PLAN " + sql.SELECT_RECENT_TURNS, ("c", "p", 9, 5))
        )
        assert "turns_channel_persona_id" in plan


async def test_turns_survive_reopen_and_keep_their_fields(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with Memory.open(db) as memory:
        await memory.set_persona("terminal:a", "haruhi")
        await memory.add_turn(
            "terminal:a",
            persona="haruhi",
            role="user",
            content="你好",
            author_id="u1",
            author_name="阿虚",
        )
        await memory.add_turn(
            "terminal:a", persona="haruhi", role="assistant", content="哼", model="m"
        )
    async with Memory.open(db) as memory:
        assert (await memory.channel("terminal:a")).persona == "haruhi"
        newest, oldest = await memory.recent_turns("terminal:a", "haruhi", limit=10)
        assert (oldest.role, oldest.content, oldest.author_name) == ("user", "你好", "阿虚")
        assert (newest.role, newest.content, newest.model) == ("assistant", "哼", "m")
        assert oldest.token_count is None
        await memory.set_token_counts([(oldest.id, 7)])
        assert (await memory.turn(oldest.id)).token_count == 7  # type: ignore[union-attr]


async def test_paging_backwards_visits_every_turn_once(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        for i in range(150):
            await memory.add_turn("c", persona="p" if i % 3 else "q", role="user", content=str(i))
        seen = [int(t.content) async for t in memory.iter_turns_backwards("c", "p", page=16)]
        assert seen == [i for i in reversed(range(150)) if i % 3]
        again = memory.iter_turns_backwards("c", "p", page=16, first_page=5)
        assert [int(t.content) async for t in again] == seen


async def test_clear_channel_only_touches_that_channel(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        for channel in ("a", "b"):
            for i in range(3):
                await memory.add_turn(channel, persona="p", role="user", content=str(i))
        assert await memory.clear_channel("a") == 3
        assert await memory.count_turns("a") == 0
        assert await memory.count_turns("b") == 3


def count_commits(memory: Memory) -> list[int]:
    """The commits `memory` makes from now on, one item each, counted as they happen."""
    commits: list[int] = []
    commit = memory.db.commit

    async def counted_commit() -> None:
        commits.append(len(commits) + 1)
        await commit()

    memory.db.commit = counted_commit  # type: ignore[method-assign]
    return commits


async def test_a_reply_is_stored_with_its_messages_and_counts_in_one_commit(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    async with Memory.open(db) as memory:
        user = await memory.add_turn("c", persona="p", role="user", content="hi")
        commits = count_commits(memory)
        reply = await memory.add_turn(
            "c",
            persona="p",
            role="assistant",
            content="a reply posted in two parts",
            token_count=9,
            posted_as=["m1", "m2"],
            counts=[(user.id, 5)],
        )
        assert commits == [1]
    async with Memory.open(db) as memory:  # on disk
        for message_id in ("m1", "m2"):
            found = await memory.turn_by_message(message_id)
            assert found is not None and found.id == reply.id
        assert reply.message_id == "m1"
        assert (await memory.turn(reply.id)).token_count == 9  # type: ignore[union-attr]
        assert (await memory.turn(user.id)).token_count == 5  # type: ignore[union-attr]


async def test_a_turn_stored_after_the_newest_were_deleted_gets_a_new_id(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        used: set[int] = set()

        async def store(channel: str, **fields: object) -> int:
            turn = await memory.add_turn(channel, persona="p", role="user", content="x", **fields)  # type: ignore[arg-type]
            assert turn.id not in used  # never the id of a turn deleted before
            used.add(turn.id)
            return turn.id

        for _ in range(3):
            await store("a")
        await memory.clear_channel("a")  # a reset deletes the newest turns
        await store("b")  # in another channel
        newest = await store("b")
        await memory.delete_turn(newest)
        await store("a")
        asked = await store("a")
        await store("a", replaces=asked)  # a retry replaces the newest
        await store("a")
    async with Memory.open(tmp_path / "m.db") as memory:  # and after a reopen
        await memory.clear_channel("a")
        await memory.clear_channel("b")
        await store("c")


async def test_a_dialogue_approved_after_the_newest_was_withdrawn_gets_a_new_id(
    tmp_path: Path,
) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        turns = [
            await memory.add_turn("c", persona="p", role="assistant", content=str(i))
            for i in range(2)
        ]
        messages: list[dict[str, str | None]] = [{"role": "assistant", "content": "0"}]
        first = await memory.add_dialogue(
            turns[0], messages, guild_id=None, approved_by="u", source="command"
        )
        assert await memory.withdraw_dialogue(turns[0].id, "command")
        second = await memory.add_dialogue(
            turns[1], messages, guild_id=None, approved_by="u", source="command"
        )
        assert second.id > first.id


# The schema before turn and dialogue ids were AUTOINCREMENT: the migrations up to m007.
OLD_SCHEMA = [m for m in sql.MIGRATIONS[: [n for n, _ in sql.MIGRATIONS].index("m007_scenes") + 1]]


def _old_database(path: Path, migrations: list[tuple[str, str]]) -> None:
    """A database of an older schema with rows in every table, turns 1-3 and 7 kept (4-6 and
    9 deleted, 9 still named by an approved dialogue) and dialogues 1 and 3 (2 withdrawn)."""
    with sqlite3.connect(path) as conn:
        conn.execute(sql.CREATE_MIGRATIONS_TABLE)
        for name, script in migrations:
            conn.executescript(sql.migration_transaction(name, script))
        applied = {name for name, _ in migrations}
        conn.execute(
            "INSERT INTO channels (id, persona, created_at, updated_at) "
            "VALUES ('c', 'p', 1, 1), ('d', 'q', 1, 1)"
        )
        for i, channel in ((1, "c"), (2, "c"), (3, "d"), (7, "c")):
            conn.execute(
                "INSERT INTO turns (id, channel_id, persona, role, author_id, author_name, "
                "content, token_count, model, message_id, created_at) "
                "VALUES (?, ?, 'p', ?, 'u1', 'Ann', ?, ?, NULL, ?, ?)",
                (i, channel, "user" if i % 2 else "assistant", f"turn {i}", i * 10, f"m{i}", i),
            )
        if "m002_discord" in applied:
            conn.execute("UPDATE channels SET guild_id = 'g', mode = 'always' WHERE id = 'c'")
            conn.execute("INSERT INTO guilds VALUES ('g', 'admins', 1)")
            conn.executemany(
                "INSERT INTO turn_messages VALUES (?, ?)", [("m2", 2), ("m2b", 2), ("m7", 7)]
            )
            conn.execute("INSERT INTO feedback VALUES (2, 'u2', 1, 1), (7, 'u2', -1, 1)")
            conn.execute(
                "INSERT INTO dialogues VALUES (1, 2, 'c', 'g', 'p', '[]', 'u2', 'command', 1), "
                "(3, 9, 'c', 'g', 'p', '[]', NULL, 'reactions', 1)"
            )
            conn.execute("INSERT INTO dialogue_authors VALUES (1, 'u1'), (3, 'u1'), (3, 'u2')")
            conn.execute("INSERT INTO summaries VALUES ('c', 'p', 'so far', 2, 5, 1)")
        if "m003_retrain" in applied:
            conn.execute(
                "INSERT INTO retrain_jobs (persona, state, min_approved, created_at, updated_at) "
                "VALUES ('p', 'done', 1, 1, 1)"
            )
        if "m005_turn_endings" in applied:
            conn.execute("UPDATE turns SET finish_reason = 'length', complete = 0 WHERE id = 2")
        if "m007_scenes" in applied:
            conn.execute(
                "INSERT INTO cast_members VALUES ('d', 'q', 0, NULL, 1), "
                "('d', 'r', 1, '{\"temperature\": 1}', 1)"
            )
            conn.execute("UPDATE turns SET prompted_by = 1 WHERE id = 7")


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as conn:
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT IN ('_migrations', 'sqlite_sequence') ORDER BY name"
            )
        ]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}"), key=repr) for t in tables}


@pytest.mark.parametrize("oldest", [False, True], ids=["m007", "m001"])
async def test_an_older_database_is_migrated_with_every_row_and_id_kept(
    tmp_path: Path, oldest: bool
) -> None:
    db = tmp_path / "m.db"
    _old_database(db, OLD_SCHEMA[:1] if oldest else OLD_SCHEMA)
    async with Memory.open(tmp_path / "plain.db"):
        pass  # (the older schema brought up to date with no rows, for comparison)
    async with Memory.open(db):
        pass
    expected = _rows(db)  # read once migrated, as the columns are now
    assert [r[0] for r in expected["turns"]] == [1, 2, 3, 7]
    if not oldest:
        with sqlite3.connect(db) as conn:
            assert conn.execute(
                "SELECT finish_reason, complete FROM turns WHERE id = 2"
            ).fetchone() == ("length", 0)
            assert conn.execute("SELECT prompted_by FROM turns WHERE id = 7").fetchone() == (1,)
            assert conn.execute(
                "SELECT turn_id FROM turn_messages ORDER BY message_id"
            ).fetchall() == [(2,), (2,), (7,)]
            assert conn.execute("SELECT turn_id FROM feedback ORDER BY turn_id").fetchall() == [
                (2,),
                (7,),
            ]
            assert conn.execute("SELECT id, turn_id FROM dialogues ORDER BY id").fetchall() == [
                (1, 2),
                (3, 9),
            ]
            assert conn.execute("SELECT COUNT(*) FROM dialogue_authors").fetchone() == (3,)
            assert conn.execute("SELECT through_id FROM summaries").fetchone() == (2,)
            assert conn.execute("SELECT COUNT(*) FROM cast_members").fetchone() == (2,)
            assert conn.execute("SELECT COUNT(*) FROM retrain_jobs").fetchone() == (1,)
    with sqlite3.connect(db) as conn, sqlite3.connect(tmp_path / "plain.db") as plain:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        schema = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        assert conn.execute(schema).fetchall() == plain.execute(schema).fetchall()
    async with Memory.open(db) as memory:  # opened again: nothing applied, nothing lost
        assert await memory.migrate() == []
        assert _rows(db) == expected
        assert (await memory.turn(7)).content == "turn 7"  # type: ignore[union-attr]
        new = await memory.add_turn("c", persona="p", role="user", content="new")
        assert new.id > (7 if oldest else 9)  # above every turn id stored or still named
        if not oldest:
            turn = await memory.turn(new.id)
            assert turn is not None
            dialogue = await memory.add_dialogue(
                turn, [], guild_id="g", approved_by="u2", source="command"
            )
            assert dialogue.id > 3 and dialogue.turn_id == new.id
        await memory.clear_channel("c")
        assert await memory.count_turns("c") == 0 and await memory.count_turns("d") == 1
        again = await memory.add_turn("c", persona="p", role="user", content="again")
        assert again.id > new.id


async def test_a_migration_that_breaks_a_reference_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "m.db"
    async with Memory.open(db) as memory:
        turn = await memory.add_turn("c", persona="p", role="user", content="kept")
        await memory.link_messages(turn.id, ["m1"])
    broken = "UPDATE turns SET content = 'changed'; DELETE FROM turns;"
    monkeypatch.setattr(sql, "MIGRATIONS", [*sql.MIGRATIONS, ("m999_broken", broken)])
    with pytest.raises(sqlite3.IntegrityError, match="m999_broken"):
        async with Memory.open(db):
            pass
    monkeypatch.undo()
    async with Memory.open(db) as memory:  # nothing of it applied or recorded
        assert await memory.migrate() == []
        found = await memory.turn_by_message("m1")
        assert found is not None and found.content == "kept"
        # foreign keys are on again: a reset deletes the turn's message links with it
        await memory.clear_channel("c")
        assert await memory.turn_by_message("m1") is None
        rows = await memory.db.execute_fetchall("SELECT * FROM turn_messages")
        assert list(rows) == []


# -- members' edited and deleted messages ------------------------------------------------------


async def _conversation(memory: Memory) -> dict[str, Turn]:
    """A Discord channel of guild g: alice's message m1 and its reply, bob's m2 and its reply
    (the replies posted as Discord messages of their own), and another channel's turn."""
    await memory.set_channel_guild("discord:1", "g")
    await memory.set_channel_guild("discord:2", "g")
    turns: dict[str, Turn] = {}
    for name, author, message in (("a", "alice", "m1"), ("b", "bob", "m2")):
        turns[name] = await memory.add_turn(
            "discord:1",
            persona="p",
            role="user",
            content=f"{author} says marker-{name}",
            author_id=author,
            author_name=author.title(),
            message_id=message,
            token_count=7,
        )
        turns[f"{name}-reply"] = await memory.add_turn(
            "discord:1",
            persona="p",
            role="assistant",
            content=f"an answer to marker-{name}",
            posted_as=[f"r{message}"],
        )
    turns["elsewhere"] = await memory.add_turn(
        "discord:2", persona="p", role="user", content="x", author_id="alice", message_id="m3"
    )
    return turns


async def _approve(memory: Memory, reply: Turn, context: list[Turn]) -> Dialogue:
    messages: list[dict[str, str | None]] = [
        {"role": t.role, "content": t.content, "author_id": t.author_id, "author_name": None}
        for t in [*context, reply]
    ]
    return await memory.add_dialogue(
        reply, messages, guild_id="g", approved_by="carol", source="command"
    )


async def test_erasing_a_message_takes_what_was_written_from_it(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        t = await _conversation(memory)
        await memory.rate(t["a-reply"].id, "bob", 1)
        await memory.rate(t["b-reply"].id, "alice", 1)
        holds_a = await _approve(memory, t["b-reply"], [t["a"], t["a-reply"], t["b"]])
        await _approve(memory, t["a-reply"], [t["a"]])
        await memory.set_summary("discord:1", "p", "alice said marker-a", through_id=t["a"].id)

        gone = await memory.erase_messages("g", "discord:1", ["m1"])

        assert [x.id for x in gone.turns] == [t["a"].id]
        assert [x.id for x in gone.replies] == [t["a-reply"].id]
        assert (gone.dialogues, gone.ratings, gone.summaries) == (2, 1, 1)
        left = await memory.recent_turns("discord:1", "p", limit=10)
        assert [x.id for x in reversed(left)] == [t["b"].id, t["b-reply"].id]
        assert await memory.dialogue_for_turn(holds_a.turn_id) is None
        assert await memory.summary("discord:1", "p") is None
        assert await memory.score(t["b-reply"].id) == (1, 0)  # bob's reply keeps its rating
        assert await memory.turn_by_message("rm1") is None  # the reply's message leads nowhere
        assert await memory.turn(t["elsewhere"].id) is not None


async def test_erasing_touches_only_members_messages_of_that_channel_and_guild(
    tmp_path: Path,
) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        t = await _conversation(memory)
        await memory.set_summary("discord:1", "p", "so far", through_id=t["b-reply"].id)
        for guild, channel, ids in (
            ("g", "discord:2", ["m1"]),  # another channel's event
            ("h", "discord:1", ["m1"]),  # another guild's
            ("g", "discord:1", ["rm1", "rm2"]),  # the persona's own replies
            ("g", "discord:1", ["999", "", "not a snowflake"]),  # unknown ids
            ("g", "discord:1", []),
        ):
            assert await memory.erase_messages(guild, channel, ids) == Erased()
            assert await memory.rewrite_message(guild, channel, (ids or ["0"])[0], "new") is None
        assert await memory.count_turns("discord:1") == 4
        assert await memory.summary("discord:1", "p") is not None
        # several at once, some unknown: one transaction for those it knows
        gone = await memory.erase_messages("g", "discord:1", ["m2", "999", "m1", "m2"])
        assert [x.id for x in gone.turns] == [t["a"].id, t["b"].id]
        assert await memory.count_turns("discord:1") == 0


async def test_erasing_a_message_in_a_scene_takes_every_reply_written_for_it(
    tmp_path: Path,
) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        await memory.set_channel_guild("discord:1", "g")
        asked = await memory.add_turn(
            "discord:1", persona="p", role="user", content="hi", author_id="a", message_id="m1"
        )
        replies = [
            await memory.add_turn(
                "discord:1", persona=p, role="assistant", content=p, prompted_by=asked.id
            )
            for p in ("p", "q", "r")
        ]
        gone = await memory.erase_messages("g", "discord:1", ["m1"])
        assert sorted(x.id for x in gone.replies) == [r.id for r in replies]
        assert await memory.count_turns("discord:1") == 0


async def test_rewriting_a_message_drops_what_held_its_old_text(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        t = await _conversation(memory)
        await memory.rate(t["b-reply"].id, "alice", 1)
        earlier = await _approve(memory, t["a-reply"], [t["a"]])
        holds_b = await _approve(memory, t["b-reply"], [t["a"], t["a-reply"], t["b"]])
        await memory.set_summary("discord:1", "p", "only a", through_id=t["a-reply"].id)
        await memory.set_summary("discord:1", "q", "a and b", through_id=t["b-reply"].id)

        edited = await memory.rewrite_message("g", "discord:1", "m2", "bob says \ud800 Lyon")

        assert edited is not None and edited.changed
        assert (edited.dialogues, edited.summaries) == (1, 1)
        stored = await memory.turn(t["b"].id)
        assert stored is not None and stored == edited.after
        assert (stored.content, stored.token_count) == ("bob says \ufffd Lyon", None)
        assert await memory.dialogue_for_turn(holds_b.turn_id) is None
        assert await memory.dialogue_for_turn(earlier.turn_id) is not None  # not b's words
        assert await memory.summary("discord:1", "p") is not None  # covers only older turns
        assert await memory.summary("discord:1", "q") is None
        assert await memory.turn(t["b-reply"].id) is not None  # the reply stays
        assert await memory.score(t["b-reply"].id) == (1, 0)


async def test_rewriting_with_the_same_text_writes_nothing(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        t = await _conversation(memory)
        holds_a = await _approve(memory, t["a-reply"], [t["a"]])
        await memory.set_summary("discord:1", "p", "so far", through_id=t["a-reply"].id)
        commits = count_commits(memory)
        same = await memory.rewrite_message("g", "discord:1", "m1", "alice says marker-a")
        assert same is not None and not same.changed
        assert commits == []
        assert await memory.turn(t["a"].id) == t["a"]  # its token count kept too
        assert await memory.dialogue_for_turn(holds_a.turn_id) is not None
        assert await memory.summary("discord:1", "p") is not None
        with pytest.raises(ValueError):
            await memory.rewrite_message("g", "discord:1", "m1", " \u200b ")


async def test_a_member_message_is_found_by_its_id_through_an_index(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db"):
        pass
    with sqlite3.connect(tmp_path / "m.db") as conn:
        plan = " ".join(
            str(r)
            for r in conn.execute(
                "EXPLAIN QUERY PLAN " + sql.SELECT_MEMBER_TURNS_BY_MESSAGES, ('["1"]', "c", "g")
            )
        )
        assert "turns_message_id" in plan


async def test_the_turns_a_reply_answers_are_those_since_the_last_reply(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:

        async def say(persona: str, role: str) -> int:
            turn = await memory.add_turn("c", persona=persona, role=role, content="x")  # type: ignore[arg-type]
            return turn.id

        first = await say("p", "user")
        assert await memory.unanswered_turns("c", "p") == [first]
        reply = await say("p", "assistant")
        waiting = [await say("p", "user"), await say("p", "user")]
        await say("q", "user")  # addressed to another persona
        assert await memory.unanswered_turns("c", "p") == waiting
        assert await memory.unanswered_turns("c", "p", before_id=reply) == [first]  # a retry
        assert await memory.all_stored([first, *waiting])
        await memory.delete_turn(first)
        assert not await memory.all_stored([first, *waiting])
        assert await memory.all_stored([])


async def test_an_approval_is_not_stored_when_a_turn_it_copied_changed(tmp_path: Path) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        t = await _conversation(memory)
        context = [t["a"], t["a-reply"], t["b"], t["b-reply"]]
        await memory.rewrite_message("g", "discord:1", "m2", "bob says something else")
        with pytest.raises(ConversationGoneError):
            await memory.add_dialogue(
                t["b-reply"], [], guild_id="g", approved_by="c", source="command", covers=context
            )
        await memory.erase_messages("g", "discord:1", ["m1"])
        with pytest.raises(ConversationGoneError):
            await memory.add_dialogue(
                t["b-reply"], [], guild_id="g", approved_by="c", source="command", covers=[t["a"]]
            )
        assert await memory.dialogue_for_turn(t["b-reply"].id) is None
        fresh = await memory.turn(t["b"].id)
        assert fresh is not None
        await memory.add_dialogue(
            t["b-reply"], [], guild_id="g", approved_by="c", source="command", covers=[fresh]
        )
        assert await memory.dialogue_for_turn(t["b-reply"].id) is not None


async def test_approving_while_a_message_of_the_dialogue_changes_approves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Memory.open(tmp_path / "m.db") as memory:
        t = await _conversation(memory)
        approvals = Approvals(memory)
        store = memory.add_dialogue

        async def edited_meanwhile(*args: Any, **kwargs: Any) -> Dialogue:
            # bob edits his message after the snapshot was taken, before it is stored
            await memory.rewrite_message("g", "discord:1", "m2", "bob says it differently")
            return await store(*args, **kwargs)

        monkeypatch.setattr(memory, "add_dialogue", edited_meanwhile)
        with pytest.raises(RolecastError, match="edited or deleted"):
            await approvals.approve(t["b-reply"], by="carol", guild_id="g")
        assert await memory.dialogue_for_turn(t["b-reply"].id) is None
        # or deletes it: the reply to it goes with it
        monkeypatch.setattr(
            memory, "rewrite_message", lambda g, c, m, _: memory.erase_messages(g, c, [m])
        )
        assert await approvals.react(t["b-reply"], "carol", 1, added=True, guild_id="g") is None
        assert await memory.dialogue_for_turn(t["b-reply"].id) is None  # (bob's reply is gone)

        monkeypatch.undo()
        dialogue, new = await approvals.approve(t["a-reply"], by="carol", guild_id="g")
        assert new and dialogue.messages[0]["content"] == "alice says marker-a"
