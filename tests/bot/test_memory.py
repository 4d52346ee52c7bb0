"""SQLite memory: migrations, WAL, turns that survive a reopen, paging through long histories."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bot.core import sql
from bot.core.memory import Memory


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


async def test_a_reply_is_stored_with_its_messages_and_counts_in_one_commit(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    async with Memory.open(db) as memory:
        user = await memory.add_turn("c", persona="p", role="user", content="hi")
        commits = 0
        commit = memory.db.commit

        async def counted_commit() -> None:
            nonlocal commits
            commits += 1
            await commit()

        memory.db.commit = counted_commit  # type: ignore[method-assign]
        reply = await memory.add_turn(
            "c",
            persona="p",
            role="assistant",
            content="a reply posted in two parts",
            token_count=9,
            posted_as=["m1", "m2"],
            counts=[(user.id, 5)],
        )
        assert commits == 1
    async with Memory.open(db) as memory:  # on disk
        for message_id in ("m1", "m2"):
            found = await memory.turn_by_message(message_id)
            assert found is not None and found.id == reply.id
        assert reply.message_id == "m1"
        assert (await memory.turn(reply.id)).token_count == 9  # type: ignore[union-attr]
        assert (await memory.turn(user.id)).token_count == 5  # type: ignore[union-attr]
