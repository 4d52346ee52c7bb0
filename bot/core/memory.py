"""Per-channel memory in SQLite: the active persona and every turn, through aiosqlite.

One `Memory` is opened by the entry point (`async with Memory.open(path) as memory`) and
passed to whatever needs it. Turns are never dropped to make a prompt fit; only `clear_channel`
(an explicit reset) deletes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosqlite

from bot.core import sql

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Turn:
    id: int
    channel_id: str
    persona: str
    role: Role
    author_id: str | None
    author_name: str | None
    content: str
    token_count: int | None
    model: str | None
    message_id: str | None
    created_at: float

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Turn:
        return cls(*row)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Channel:
    id: str
    persona: str | None
    created_at: float
    updated_at: float


class Memory:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path | str) -> AsyncIterator[Memory]:
        """Open (creating if needed) and migrate the database; close it on exit."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path))
        try:
            for pragma in sql.PRAGMAS:
                await db.execute(pragma)
            memory = cls(db)
            await memory.migrate()
            yield memory
        finally:
            await db.close()

    async def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded; return their names."""
        await self.db.execute(sql.CREATE_MIGRATIONS_TABLE)
        async with self.db.execute(sql.SELECT_APPLIED_MIGRATIONS) as cursor:
            applied = {row[0] async for row in cursor}
        done = []
        for name, script in sql.MIGRATIONS:
            if name in applied:
                continue
            log.info("applying migration %s", name)
            await self.db.executescript(sql.migration_transaction(name, script))
            done.append(name)
        return done

    # -- channels -------------------------------------------------------------------------

    async def channel(self, channel_id: str) -> Channel:
        """The channel's state, creating an empty row the first time it is seen."""
        now = time.time()
        await self.db.execute(sql.UPSERT_CHANNEL, (channel_id, now, now))
        await self.db.commit()
        async with self.db.execute(sql.SELECT_CHANNEL, (channel_id,)) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return Channel(*row)

    async def set_persona(self, channel_id: str, persona: str) -> None:
        await self.channel(channel_id)
        await self.db.execute(sql.UPDATE_CHANNEL_PERSONA, (persona, time.time(), channel_id))
        await self.db.commit()

    # -- turns ----------------------------------------------------------------------------

    async def add_turn(
        self,
        channel_id: str,
        *,
        persona: str,
        role: Role,
        content: str,
        author_id: str | None = None,
        author_name: str | None = None,
        token_count: int | None = None,
        model: str | None = None,
        message_id: str | None = None,
    ) -> Turn:
        """Store one turn and commit before returning: once this returns it is on disk."""
        await self.channel(channel_id)
        now = time.time()
        values = (
            channel_id,
            persona,
            role,
            author_id,
            author_name,
            content,
            token_count,
            model,
            message_id,
            now,
        )
        cursor = await self.db.execute(sql.INSERT_TURN, values)
        await self.db.commit()
        assert cursor.lastrowid is not None
        return Turn(cursor.lastrowid, *values)  # type: ignore[arg-type]

    async def turn(self, turn_id: int) -> Turn | None:
        async with self.db.execute(sql.SELECT_TURN, (turn_id,)) as cursor:
            row = await cursor.fetchone()
        return Turn.from_row(row) if row else None

    async def recent_turns(
        self, channel_id: str, persona: str, *, limit: int, before_id: int | None = None
    ) -> list[Turn]:
        """Up to `limit` turns of `persona` in the channel, newest first, older than
        `before_id` when given (for paging backwards through a long history)."""
        upper = before_id if before_id is not None else 2**63 - 1
        async with self.db.execute(
            sql.SELECT_RECENT_TURNS, (channel_id, persona, upper, limit)
        ) as cursor:
            return [Turn.from_row(row) async for row in cursor]

    async def iter_turns_backwards(
        self, channel_id: str, persona: str, *, page: int = 64
    ) -> AsyncIterator[Turn]:
        """Every turn of `persona` in the channel, newest first, fetched a page at a time."""
        before: int | None = None
        while True:
            turns = await self.recent_turns(channel_id, persona, limit=page, before_id=before)
            for turn in turns:
                yield turn
            if len(turns) < page:
                return
            before = turns[-1].id

    async def set_token_counts(self, counts: Sequence[tuple[int, int]]) -> None:
        """Cache prompt-token counts: `(turn_id, count)` pairs."""
        await self.db.executemany(sql.UPDATE_TURN_TOKEN_COUNT, [(n, i) for i, n in counts])
        await self.db.commit()

    async def count_turns(self, channel_id: str) -> int:
        async with self.db.execute(sql.COUNT_CHANNEL_TURNS, (channel_id,)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def delete_turn(self, turn_id: int) -> None:
        await self.db.execute(sql.DELETE_TURN, (turn_id,))
        await self.db.commit()

    async def clear_channel(self, channel_id: str) -> int:
        """Delete every turn of the channel (an explicit reset); return how many."""
        cursor = await self.db.execute(sql.DELETE_CHANNEL_TURNS, (channel_id,))
        await self.db.commit()
        return cursor.rowcount
