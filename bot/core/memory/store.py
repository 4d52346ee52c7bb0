"""The `Memory` class: the connection, opening and migrating the database, the locks, a
channel's persona and its turns (with the platform messages they were posted as). Its
other method groups are mixins in the modules beside it, listed in `bot.core.memory`."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import astuple, replace
from pathlib import Path

import aiosqlite

from bot.core import sql
from bot.core.memory.dialogues import DialoguesMixin
from bot.core.memory.forgetting import ForgettingMixin
from bot.core.memory.records import Cast, Channel, Role, Turn
from bot.core.memory.scenes import ScenesMixin
from bot.core.memory.settings import SettingsMixin
from bot.core.memory.summaries import SummariesMixin
from bot.core.queue import ChannelQueue
from bot.core.text import clean_text
from bot.errors import ConversationGoneError

log = logging.getLogger(__name__)

# The largest integer SQLite stores: a row limit past it (`/history 99999999999999999999`) is
# all rows, not an OverflowError.
SQLITE_MAX_INT = 2**63 - 1


def _row_limit(limit: int) -> int:
    return max(0, min(limit, SQLITE_MAX_INT))


def _cast_keys(persona: Cast) -> tuple[str, ...]:
    return (persona,) if isinstance(persona, str) else persona


class Memory(SettingsMixin, ScenesMixin, DialoguesMixin, ForgettingMixin, SummariesMixin):
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        # Held while a conversation is deleted (a reset, forget-me) and while a turn or a
        # summary is stored: a reply or a summary is stored only if the turns it was written
        # from are still there (`add_turn`, `set_summary`).
        self._deleting = asyncio.Lock()
        # A channel's cast changes one at a time: each reads the cast, decides and writes, and
        # the connection (one transaction for every caller) cannot keep another's change out.
        self._casting = ChannelQueue()

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
        """Apply the migrations not yet recorded; return their names.

        Each is one transaction with its record. Foreign keys are off while they run (a
        table is changed by rebuilding it, and dropping the old one must not delete the rows
        that reference it), and each is checked for references to missing rows before it
        commits: one that leaves any is rolled back and raises sqlite3.IntegrityError."""
        await self.db.execute(sql.CREATE_MIGRATIONS_TABLE)
        async with self.db.execute(sql.SELECT_APPLIED_MIGRATIONS) as cursor:
            applied = {row[0] async for row in cursor}
        pending = [(name, script) for name, script in sql.MIGRATIONS if name not in applied]
        if not pending:
            return []
        done = []
        await self.db.execute(sql.FOREIGN_KEYS_OFF)
        try:
            for name, script in pending:
                log.info("applying migration %s", name)
                try:
                    await self.db.executescript(
                        sql.migration_transaction(name, script, commit=False)
                    )
                    broken = list(await self.db.execute_fetchall(sql.FOREIGN_KEY_CHECK))
                    if broken:
                        raise sqlite3.IntegrityError(
                            f"migration {name} would leave {len(broken)} references to "
                            f"missing rows, such as {tuple(broken[0])}"
                        )
                except BaseException:
                    await self.db.rollback()
                    raise
                await self.db.commit()
                done.append(name)
        finally:
            await self.db.execute(sql.FOREIGN_KEYS_ON)
        return done

    # -- channels -------------------------------------------------------------------------

    async def channel(self, channel_id: str) -> Channel:
        """The channel's state; a channel never written to has no persona. A pure read: the
        message path asks this several times per message, and a write transaction each time
        would cost more than the rest of the bot's work."""
        async with self.db.execute(sql.SELECT_CHANNEL, (channel_id,)) as cursor:
            row = await cursor.fetchone()
        return Channel(*row) if row is not None else Channel(channel_id, None, 0.0, 0.0)

    async def _ensure_channel(self, channel_id: str) -> None:
        """Create the channel's row if missing, inside the caller's transaction (no commit)."""
        now = time.time()
        await self.db.execute(sql.UPSERT_CHANNEL, (channel_id, now, now))

    async def set_persona(self, channel_id: str, persona: str) -> None:
        """Make `persona` the channel's one persona (a scene's cast, if any, is dissolved)."""
        async with self._casting.slot(channel_id):
            await self._set_persona(channel_id, persona)

    async def _set_persona(self, channel_id: str, persona: str) -> None:
        await self._ensure_channel(channel_id)
        await self.db.execute(sql.DELETE_CAST, (channel_id,))
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
        posted_as: Sequence[str] = (),
        counts: Sequence[tuple[int, int]] = (),
        finish_reason: str | None = None,
        complete: bool = True,
        prompted_by: int | None = None,
        answers: Sequence[int] = (),
        replaces: int | None = None,
    ) -> Turn:
        """Store one turn and commit before returning: once this returns it is on disk.

        In the same transaction: the platform messages the turn was posted as (see
        `link_messages`; the first becomes its `message_id`) and token counts of other turns
        to cache (see `set_token_counts`), so a reply costs one commit. Text that cannot be
        encoded (lone surrogates) is repaired first, so storing a turn never fails on it.

        `answers`: the turns a reply was written from; when one of them was deleted while it
        was written (a reset, forget-me), nothing is stored and ConversationGoneError says so.
        `replaces`: a turn this one is written again in place of (`/retry`), deleted in the
        same transaction, so one of the two is always there."""
        async with self._deleting:
            await self._require_turns(answers)
            return await self._add_turn(
                channel_id,
                persona,
                role,
                content,
                author_id,
                author_name,
                token_count,
                model,
                message_id,
                posted_as,
                counts,
                finish_reason,
                complete,
                prompted_by,
                replaces,
            )

    async def _add_turn(
        self,
        channel_id: str,
        persona: str,
        role: Role,
        content: str,
        author_id: str | None,
        author_name: str | None,
        token_count: int | None,
        model: str | None,
        message_id: str | None,
        posted_as: Sequence[str],
        counts: Sequence[tuple[int, int]],
        finish_reason: str | None,
        complete: bool,
        prompted_by: int | None,
        replaces: int | None = None,
    ) -> Turn:
        if posted_as and message_id is None:
            message_id = posted_as[0]
        await self._ensure_channel(channel_id)
        now = time.time()
        turn = Turn(
            0,
            channel_id,
            persona,
            role,
            author_id,
            clean_text(author_name) if author_name is not None else None,
            clean_text(content),
            token_count,
            model,
            message_id,
            now,
            finish_reason,
            complete,
            prompted_by,
        )
        values = astuple(turn)[1:]
        cursor = await self.db.execute(sql.INSERT_TURN, values)
        turn_id = cursor.lastrowid
        assert turn_id is not None
        if posted_as:
            await self.db.executemany(sql.INSERT_TURN_MESSAGE, [(m, turn_id) for m in posted_as])
        if counts:
            await self.db.executemany(sql.UPDATE_TURN_TOKEN_COUNT, [(n, i) for i, n in counts])
        if replaces is not None:
            await self.db.execute(sql.DELETE_TURN, (replaces,))
        await self.db.commit()
        return replace(turn, id=turn_id)

    async def _require_turns(self, turn_ids: Iterable[int]) -> None:
        """ConversationGoneError unless every one of these turns is still stored; hold
        `_deleting`, so that none goes before what was written from them is stored. (Ids are
        never given again: a missing one was deleted, never replaced.)"""
        if not await self.all_stored(turn_ids):
            raise ConversationGoneError()

    async def all_stored(self, turn_ids: Iterable[int]) -> bool:
        """Whether every one of these turns is still stored (one query, however many)."""
        ids = sorted(set(turn_ids))
        if not ids:
            return True
        async with self.db.execute(sql.COUNT_TURNS_IN, (json.dumps(ids),)) as cursor:
            row = await cursor.fetchone()
        return row is not None and int(row[0]) == len(ids)

    async def unanswered_turns(
        self, channel_id: str, persona: str, *, before_id: int | None = None
    ) -> list[int]:
        """The member turns addressed to `persona` since its last reply in the channel (before
        `before_id`, when given): a reply it writes now is the first reply after each of them,
        the reply that forget-me and a deleted message take with them."""
        upper = before_id if before_id is not None else SQLITE_MAX_INT
        rows = await self.db.execute_fetchall(
            sql.SELECT_UNANSWERED_TURNS, (channel_id, persona, upper)
        )
        return [int(r[0]) for r in rows]

    async def turn(self, turn_id: int) -> Turn | None:
        async with self.db.execute(sql.SELECT_TURN, (turn_id,)) as cursor:
            row = await cursor.fetchone()
        return Turn.from_row(row) if row else None

    async def recent_turns(
        self, channel_id: str, persona: Cast, *, limit: int, before_id: int | None = None
    ) -> list[Turn]:
        """Up to `limit` turns of `persona` (or of a cast) in the channel, newest first, older
        than `before_id` when given (for paging backwards through a long history)."""
        upper = before_id if before_id is not None else SQLITE_MAX_INT
        limit = _row_limit(limit)
        keys = _cast_keys(persona)
        # fetchall: one trip to the database thread, where async iteration makes one per 64 rows
        if len(keys) == 1:
            rows = await self.db.execute_fetchall(
                sql.SELECT_RECENT_TURNS, (channel_id, keys[0], upper, limit)
            )
        else:
            rows = await self.db.execute_fetchall(
                sql.SELECT_RECENT_CAST_TURNS, (channel_id, json.dumps(keys), upper, limit)
            )
        return [Turn.from_row(row) for row in rows]

    async def iter_turns_backwards(
        self,
        channel_id: str,
        persona: Cast,
        *,
        page: int = 256,
        first_page: int | None = None,
        before_id: int | None = None,
    ) -> AsyncIterator[Turn]:
        """Every turn of `persona` (or of a cast) in the channel (older than `before_id` when
        given), newest first, fetched a page at a time (the first page `first_page` long, when
        the caller knows how many it will want)."""
        before = before_id
        limit = first_page or page
        while True:
            turns = await self.recent_turns(channel_id, persona, limit=limit, before_id=before)
            for turn in turns:
                yield turn
            if len(turns) < limit:
                return
            before = turns[-1].id
            limit = page

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
        async with self._deleting:
            cursor = await self.db.execute(sql.DELETE_CHANNEL_TURNS, (channel_id,))
            await self.db.execute(sql.DELETE_CHANNEL_SUMMARIES, (channel_id,))
            await self.db.commit()
        return cursor.rowcount

    # -- platform messages of turns --------------------------------------------------------

    async def link_messages(self, turn_id: int, message_ids: Sequence[str]) -> None:
        """Record the platform messages a turn was posted as; the first becomes its id."""
        if not message_ids:
            return
        await self.db.executemany(sql.INSERT_TURN_MESSAGE, [(m, turn_id) for m in message_ids])
        await self.db.execute(sql.UPDATE_TURN_MESSAGE_ID, (message_ids[0], turn_id))
        await self.db.commit()

    async def turn_by_message(self, message_id: str) -> Turn | None:
        async with self.db.execute(sql.SELECT_TURN_BY_MESSAGE, (message_id,)) as cursor:
            row = await cursor.fetchone()
        return Turn.from_row(row) if row else None

    async def last_assistant_id(self, channel_id: str, persona: str) -> int | None:
        async with self.db.execute(sql.SELECT_LAST_ASSISTANT_ID, (channel_id, persona)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    async def turns_between(
        self, channel_id: str, persona: Cast, *, after_id: int, before_id: int, limit: int
    ) -> list[Turn]:
        """Turns with `after_id < id < before_id`, oldest first, at most `limit`."""
        limit = _row_limit(limit)
        keys = _cast_keys(persona)
        query, which = (
            (sql.SELECT_TURNS_BETWEEN, keys[0])
            if len(keys) == 1
            else (sql.SELECT_CAST_TURNS_BETWEEN, json.dumps(keys))
        )
        async with self.db.execute(
            query, (channel_id, which, after_id, before_id, limit)
        ) as cursor:
            return [Turn.from_row(row) async for row in cursor]
