"""Per-channel memory in SQLite: the active persona (or a scene's cast) and every turn,
through aiosqlite.

One `Memory` is opened by the entry point (`async with Memory.open(path) as memory`) and
passed to whatever needs it. Turns are never dropped to make a prompt fit; only an explicit
deletion does: a reset (`clear_channel`), forget-me (`forget_author`), a member deleting their
message (`erase_messages`).

A turn belongs to a persona: the one that wrote a reply, or the one a member's message was
addressed to. A channel's history is the turns of its cast: one persona's turns in a channel
with one persona (as before scenes), every cast member's in a scene. Where a method takes
`persona: Cast`, a key reads one persona's turns and a tuple of keys a cast's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Literal

import aiosqlite

from bot.core import sql
from bot.core.queue import ChannelQueue
from bot.core.quotes import Quotes
from bot.core.text import blank, clean_text
from bot.errors import ConversationGoneError, SceneFullError

log = logging.getLogger(__name__)

Role = Literal["user", "assistant"]
TurnPolicy = Literal["round-robin", "keywords"]
# One persona's key, or a scene's cast (its keys, in order).
Cast = str | tuple[str, ...]
# How far back the newest reply is looked for, to go round the cast in turn.
LAST_SPEAKER_DEPTH = 64
# The largest integer SQLite stores: a row limit past it (`/history 99999999999999999999`) is
# all rows, not an OverflowError.
SQLITE_MAX_INT = 2**63 - 1


def _row_limit(limit: int) -> int:
    return max(0, min(limit, SQLITE_MAX_INT))


def _json_object(raw: object, what: str) -> dict[str, object] | None:
    """A stored JSON object (sampling overrides), or None when the row holds none or something
    unreadable: one broken row must not silence its channel."""
    if not raw:
        return None
    try:
        value = json.loads(str(raw))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        log.warning("ignoring %s: not a JSON object: %.80r", what, raw)
        return None
    return value


def _dialogue_messages(raw: object, dialogue_id: object) -> list[dict[str, str | None]]:
    """An approved dialogue's stored messages, each a map of text fields; [] when the row
    cannot be read (the export leaves it out, forget-me searches its raw text)."""
    try:
        value = json.loads(str(raw))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        log.warning("approved dialogue %s has unreadable messages; it is left out", dialogue_id)
        return []
    return [
        {str(k): None if v is None else clean_text(str(v)) for k, v in m.items()} for m in value
    ]


def _cast_keys(persona: Cast) -> tuple[str, ...]:
    return (persona,) if isinstance(persona, str) else persona


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
    finish_reason: str | None = None  # how an assistant turn ended, as the server said
    complete: bool = True  # False: cut at the token limit, or the stream broke
    prompted_by: int | None = None  # a scene's reply: the member's turn it was written for

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Turn:
        values = list(row)
        values[12] = bool(values[12])  # `complete` is stored as 0/1
        return cls(*values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Channel:
    id: str
    persona: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ChannelSettings:
    """How a channel's persona is triggered and samples (admins set these), and its cast."""

    guild_id: str | None
    mode: Literal["mention", "always"]
    sampling: dict[str, object] | None
    persona: str | None = None  # the active persona's key (read with the settings)
    # A scene: its cast in order (the first is `persona`); one persona's channel: (persona,).
    cast: tuple[str, ...] = ()
    policy: TurnPolicy = "round-robin"
    chain_limit: int = 2
    next_persona: str | None = None  # handed the next turn
    # sampling overrides of cast members, by key
    cast_sampling: dict[str, dict[str, object]] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """The rolling summary of a persona's turns with id <= `through_id` in one channel."""

    content: str
    through_id: int
    token_count: int | None
    updated_at: float


@dataclass(frozen=True)
class Dialogue:
    """An approved reply with the turns before it, frozen as training data."""

    id: int
    turn_id: int
    channel_id: str
    guild_id: str | None
    persona: str
    messages: list[dict[str, str | None]]
    approved_by: str | None
    source: Literal["command", "reactions"]
    created_at: float

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Dialogue:
        values = list(row)
        values[5] = _dialogue_messages(values[5], values[0])
        return cls(*values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Forgotten:
    """What forget-me deleted from the database (`bot.core.forget` adds the files)."""

    turns: int  # the member's messages
    dialogues: int  # approved dialogues they wrote in, approved, or that quote them
    ratings: int
    replies: int = 0  # persona replies that answered or quoted them
    mentions: int = 0  # other turns and dialogues whose mentions of their id were redacted
    jobs: int = 0  # retrain jobs they requested (the request is kept, their id is not)
    texts: tuple[str, ...] = ()  # what they wrote, to find in files
    row_ids: frozenset[str] = frozenset()  # the deleted dialogues' ids in training files


@dataclass(frozen=True)
class Erased:
    """What deleting members' messages took from the database (`Memory.erase_messages`)."""

    turns: tuple[Turn, ...] = ()  # the members' messages
    replies: tuple[Turn, ...] = ()  # persona replies written from them
    dialogues: int = 0  # approved dialogues that held one of those
    ratings: int = 0  # ratings of those replies
    summaries: int = 0  # summaries that covered them, dropped to be rebuilt


@dataclass(frozen=True)
class Rewritten:
    """A member's edited message: its turn before and after (`Memory.rewrite_message`)."""

    before: Turn
    after: Turn
    dialogues: int = 0  # approved dialogues that held the old text, deleted
    summaries: int = 0  # summaries that covered it, dropped to be rebuilt

    @property
    def changed(self) -> bool:
        return self.before.content != self.after.content


class Memory:
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

    # -- scenes: a channel's cast ---------------------------------------------------------

    async def cast(self, channel_id: str) -> tuple[str, ...]:
        """The channel's cast in order: its scene's members, or its one persona, or nobody."""
        return (await self.channel_settings(channel_id)).cast

    async def add_cast_member(
        self, channel_id: str, persona: str, *, most: int | None = None
    ) -> bool:
        """Add `persona` to the channel's cast (after the others); False if it is in it. A
        channel with no persona gets it as its one persona; a channel with one persona
        becomes a scene of two, the first member leading. SceneFullError when the cast has
        `most` members already."""
        async with self._casting.slot(channel_id):
            return await self._add_cast_member(channel_id, persona, most)

    async def _add_cast_member(self, channel_id: str, persona: str, most: int | None) -> bool:
        settings = await self.channel_settings(channel_id)
        added = persona not in settings.cast
        if added and most is not None and len(settings.cast) >= most:
            raise SceneFullError(len(settings.cast))
        await self._ensure_channel(channel_id)
        now = time.time()
        if added and not settings.cast:
            await self.db.execute(sql.UPDATE_CHANNEL_PERSONA, (persona, now, channel_id))
        elif added:
            rows = [(channel_id, key, channel_id, now) for key in (*settings.cast, persona)]
            await self.db.executemany(sql.INSERT_CAST_MEMBER, rows)  # (members kept)
            await self.db.execute(sql.UPDATE_CHANNEL_LEAD, (now, channel_id))
        await self.db.commit()
        return added

    async def remove_cast_member(self, channel_id: str, persona: str) -> bool:
        """Take `persona` out of the channel's cast; False if it was not in it. A scene left
        with one member is a channel with one persona again."""
        async with self._casting.slot(channel_id):
            return await self._remove_cast_member(channel_id, persona)

    async def _remove_cast_member(self, channel_id: str, persona: str) -> bool:
        now = time.time()
        settings = await self.channel_settings(channel_id)
        if persona not in settings.cast:
            return False
        await self.db.execute(sql.DELETE_CAST_MEMBER, (channel_id, persona))
        if len(settings.cast) <= 2:
            await self.db.execute(sql.DELETE_CAST, (channel_id,))
            rest = [p for p in settings.cast if p != persona]
            await self.db.execute(
                sql.UPDATE_CHANNEL_PERSONA, (rest[0] if rest else None, now, channel_id)
            )
        else:
            await self.db.execute(sql.UPDATE_CHANNEL_LEAD, (now, channel_id))
        if settings.next_persona == persona:
            await self.db.execute(sql.UPDATE_NEXT_PERSONA, (None, now, channel_id))
        await self.db.commit()
        return True

    async def set_cast(self, channel_id: str, personas: Sequence[str]) -> None:
        """Make `personas` the channel's cast, in this order (one: a plain channel)."""
        async with self._casting.slot(channel_id):
            await self._set_cast(channel_id, personas)

    async def _set_cast(self, channel_id: str, personas: Sequence[str]) -> None:
        keys = list(dict.fromkeys(personas))
        if len(keys) <= 1:
            if keys:
                await self._set_persona(channel_id, keys[0])
            return
        await self._ensure_channel(channel_id)
        now = time.time()
        await self.db.execute(sql.DELETE_CAST, (channel_id,))
        await self.db.executemany(
            sql.INSERT_CAST_MEMBER, [(channel_id, key, channel_id, now) for key in keys]
        )
        await self.db.execute(sql.UPDATE_CHANNEL_LEAD, (now, channel_id))
        await self.db.commit()

    async def set_cast_sampling(
        self, channel_id: str, persona: str, sampling: dict[str, object] | None
    ) -> None:
        """Sampling overrides for one member of a scene (None: the channel's)."""
        raw = json.dumps(sampling, sort_keys=True) if sampling else None
        await self.db.execute(sql.UPDATE_CAST_SAMPLING, (raw, channel_id, persona))
        await self.db.commit()

    async def set_turn_policy(self, channel_id: str, policy: TurnPolicy, chain_limit: int) -> None:
        await self._ensure_channel(channel_id)
        await self.db.execute(
            sql.UPDATE_TURN_POLICY, (policy, chain_limit, time.time(), channel_id)
        )
        await self.db.commit()

    async def set_next_persona(self, channel_id: str, persona: str | None) -> None:
        """Hand the channel's next turn to `persona` (None: to whoever the policy picks)."""
        await self._ensure_channel(channel_id)
        await self.db.execute(sql.UPDATE_NEXT_PERSONA, (persona, time.time(), channel_id))
        await self.db.commit()

    async def last_speaker(self, channel_id: str, cast: Sequence[str]) -> str | None:
        """The cast member that wrote the newest reply among the cast's newest turns."""
        rows = list(
            await self.db.execute_fetchall(
                sql.SELECT_LAST_SPEAKER, (channel_id, json.dumps(list(cast)), LAST_SPEAKER_DEPTH)
            )
        )
        return str(rows[0][0]) if rows else None

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

    async def _require_unchanged(self, turns: Iterable[Turn]) -> None:
        """ConversationGoneError unless every one of these turns is still stored with the text
        it had when it was read (a member may have deleted or edited it since); hold
        `_deleting`, as for `_require_turns`."""
        read = {t.id: t.content for t in turns}
        if not read:
            return
        rows = await self.db.execute_fetchall(
            sql.SELECT_TURN_CONTENTS_IN, (json.dumps(sorted(read)),)
        )
        if {int(r[0]): str(r[1]) for r in rows} != read:
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

    # -- channel settings (Discord) -------------------------------------------------------

    async def channel_settings(self, channel_id: str) -> ChannelSettings:
        async with self.db.execute(sql.SELECT_CHANNEL_SETTINGS, (channel_id,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return ChannelSettings(None, "mention", None)
        sampling = _json_object(row[2], f"the sampling of {channel_id}")
        members: list[tuple[str, str | None]] = json.loads(row[7]) if row[7] else []
        persona = row[3]
        cast = tuple(m[0] for m in members) or ((persona,) if persona is not None else ())
        return ChannelSettings(
            row[0],
            row[1],
            sampling,
            persona,
            cast=cast,
            policy=row[4],
            chain_limit=int(row[5]),
            next_persona=row[6],
            cast_sampling={
                m[0]: own
                for m in members
                if (own := _json_object(m[1], f"the sampling of {m[0]} in {channel_id}"))
            },
        )

    async def set_channel_guild(self, channel_id: str, guild_id: str | None) -> None:
        """Record which guild a channel belongs to (forget-me works per guild)."""
        await self._ensure_channel(channel_id)
        cursor = await self.db.execute(sql.UPDATE_CHANNEL_GUILD, (guild_id, channel_id, guild_id))
        if cursor.rowcount:
            await self.db.commit()

    async def set_channel_mode(self, channel_id: str, mode: Literal["mention", "always"]) -> None:
        await self._ensure_channel(channel_id)
        await self.db.execute(sql.UPDATE_CHANNEL_MODE, (mode, time.time(), channel_id))
        await self.db.commit()

    async def set_channel_sampling(
        self, channel_id: str, sampling: dict[str, object] | None
    ) -> None:
        await self._ensure_channel(channel_id)
        raw = json.dumps(sampling, sort_keys=True) if sampling else None
        await self.db.execute(sql.UPDATE_CHANNEL_SAMPLING, (raw, time.time(), channel_id))
        await self.db.commit()

    async def clear_persona_everywhere(self, persona: str) -> int:
        """Take `persona` out of every channel that has it (it was removed): unset where it
        was the one persona, out of the cast of every scene (the others play on). Returns how
        many channels no longer have a persona."""
        now = time.time()
        scenes = [
            str(r[0]) for r in await self.db.execute_fetchall(sql.SELECT_CAST_CHANNELS, (persona,))
        ]
        await self.db.execute(sql.DELETE_PERSONA_FROM_CASTS, (persona,))
        await self.db.execute(sql.CLEAR_NEXT_PERSONA_EVERYWHERE, (persona,))
        for channel_id in scenes:
            # the first member left leads; a scene of one is a plain channel again
            rest = [
                str(r[0]) for r in await self.db.execute_fetchall(sql.SELECT_CAST, (channel_id,))
            ]
            if len(rest) <= 1:
                await self.db.execute(sql.DELETE_CAST, (channel_id,))
            await self.db.execute(
                sql.UPDATE_CHANNEL_PERSONA, (rest[0] if rest else None, now, channel_id)
            )
        cursor = await self.db.execute(sql.CLEAR_PERSONA_EVERYWHERE, (now, persona))
        await self.db.commit()
        return cursor.rowcount

    async def admin_role(self, guild_id: str) -> str | None:
        async with self.db.execute(sql.SELECT_GUILD_ADMIN_ROLE, (guild_id,)) as cursor:
            row = await cursor.fetchone()
        return str(row[0]) if row and row[0] else None

    async def set_admin_role(self, guild_id: str, role_id: str | None) -> None:
        await self.db.execute(sql.UPSERT_GUILD_ADMIN_ROLE, (guild_id, role_id, time.time()))
        await self.db.commit()

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

    # -- feedback and approved dialogues -----------------------------------------------------

    async def rate(self, turn_id: int, user_id: str, rating: Literal[-1, 1]) -> None:
        await self.db.execute(sql.UPSERT_FEEDBACK, (turn_id, user_id, rating, time.time()))
        await self.db.commit()

    async def unrate(self, turn_id: int, user_id: str, rating: Literal[-1, 1]) -> None:
        await self.db.execute(sql.DELETE_FEEDBACK, (turn_id, user_id, rating))
        await self.db.commit()

    async def score(self, turn_id: int) -> tuple[int, int]:
        """(thumbs up, thumbs down) of a reply."""
        async with self.db.execute(sql.SELECT_FEEDBACK_SCORE, (turn_id,)) as cursor:
            row = await cursor.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def add_dialogue(
        self,
        turn: Turn,
        messages: list[dict[str, str | None]],
        *,
        guild_id: str | None,
        approved_by: str | None,
        source: Literal["command", "reactions"],
        covers: Sequence[Turn] = (),
    ) -> Dialogue:
        """Freeze an approved reply and its context; approving twice keeps the first.

        `covers`: the turns `messages` were copied from; when one of them was deleted or edited
        since (a reset, forget-me, a member deleting or editing their message), nothing is
        stored and ConversationGoneError says so: the dialogue would keep words that are gone."""
        authors = sorted({str(m["author_id"]) for m in messages if m.get("author_id")})
        async with self._deleting:
            await self._require_unchanged(covers)
            cursor = await self.db.execute(
                sql.INSERT_DIALOGUE,
                (
                    turn.id,
                    turn.channel_id,
                    guild_id,
                    turn.persona,
                    json.dumps(messages, ensure_ascii=False),
                    approved_by,
                    source,
                    time.time(),
                ),
            )
            if cursor.rowcount:
                await self.db.executemany(
                    sql.INSERT_DIALOGUE_AUTHOR, [(cursor.lastrowid, a) for a in authors]
                )
            await self.db.commit()
        dialogue = await self.dialogue_for_turn(turn.id)
        assert dialogue is not None
        return dialogue

    async def dialogue_for_turn(self, turn_id: int) -> Dialogue | None:
        async with self.db.execute(sql.SELECT_DIALOGUE_BY_TURN, (turn_id,)) as cursor:
            row = await cursor.fetchone()
        return Dialogue.from_row(row) if row else None

    async def dialogues(self, persona: str, *, guild_id: str | None = None) -> list[Dialogue]:
        """Approved dialogues of a persona (of one guild when given), oldest first."""
        async with self.db.execute(
            sql.SELECT_PERSONA_DIALOGUES, (persona, guild_id, guild_id)
        ) as cursor:
            return [Dialogue.from_row(row) async for row in cursor]

    async def count_dialogues(self, persona: str, *, guild_id: str | None = None) -> int:
        """Approved dialogues of a persona (in one guild when given)."""
        async with self.db.execute(
            sql.COUNT_PERSONA_DIALOGUES, (persona, guild_id, guild_id)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def withdraw_dialogue(
        self, turn_id: int, source: Literal["command", "reactions"]
    ) -> bool:
        cursor = await self.db.execute(sql.DELETE_DIALOGUE_BY_TURN, (turn_id, source))
        await self.db.commit()
        return cursor.rowcount > 0

    async def forget_author(self, guild_id: str, author_id: str) -> Forgotten:
        """Delete, within one guild, everything that holds what a person said or their id:
        their turns and ratings; the persona replies that answered them (the first reply after
        each of their turns, written from their words) or quote them (`bot.core.quotes`); the
        approved dialogues they wrote in, approved, or that quote them; their id in other turns'
        mentions (redacted) and in the retrain jobs they asked for (unlinked). The guild's
        summaries go too (they may quote them) and are rebuilt from the remaining turns.
        Deleted text is overwritten (`secure_delete`); `compact` then clears it from the file
        and the write-ahead log."""
        async with self._deleting:
            return await self._forget_author(guild_id, author_id)

    async def _forget_author(self, guild_id: str, author_id: str) -> Forgotten:
        db = self.db
        mine = [
            Turn.from_row(r)
            for r in await db.execute_fetchall(
                sql.SELECT_AUTHOR_TURNS_IN_GUILD, (author_id, guild_id)
            )
        ]
        quotes = Quotes(t.content for t in mine)
        replies = {
            int(r[0])
            for r in await db.execute_fetchall(
                sql.SELECT_REPLIES_TO_AUTHOR_IN_GUILD, (author_id, guild_id)
            )
            if r[0] is not None
        }
        # in a scene, every persona's reply written for their message, and the replies of the
        # chain it began (each had their words in its prompt)
        replies.update(
            int(r[0])
            for r in await db.execute_fetchall(
                sql.SELECT_PROMPTED_BY_AUTHOR_IN_GUILD, (author_id, guild_id)
            )
        )
        if quotes:
            after = 0
            while True:
                page = list(
                    await db.execute_fetchall(
                        sql.SELECT_GUILD_ASSISTANT_TURNS_PAGE, (after, guild_id, 500)
                    )
                )
                if not page:
                    break
                after = int(page[-1][0])
                found = await asyncio.to_thread(
                    lambda rows: [int(r[0]) for r in rows if quotes.found_in(str(r[1]))], page
                )
                replies.update(found)
        doomed = {
            int(r[0])
            for r in await db.execute_fetchall(
                sql.SELECT_AUTHOR_DIALOGUE_IDS_IN_GUILD, (guild_id, author_id, author_id)
            )
        }
        rows = list(await db.execute_fetchall(sql.SELECT_GUILD_DIALOGUES, (guild_id,)))
        dialogues = [Dialogue.from_row(r) for r in rows]
        mention = re.compile(rf"<@!?{re.escape(author_id)}>|(?<!\d){re.escape(author_id)}(?!\d)")
        # A dialogue whose stored messages cannot be read may still hold their words or id:
        # its raw text is searched, and it goes when either is in it.
        for r, dialogue in zip(rows, dialogues, strict=True):
            raw = clean_text(str(r[5]))
            if not dialogue.messages and (mention.search(raw) or quotes.found_in(raw)):
                doomed.add(dialogue.id)
        redact: dict[int, list[dict[str, str | None]]] = {}
        for dialogue in dialogues:
            contents = [str(m.get("content") or "") for m in dialogue.messages]
            if (
                dialogue.turn_id in replies
                or any(m.get("author_id") == author_id for m in dialogue.messages)
                or any(quotes.found_in(c) for c in contents)
            ):
                doomed.add(dialogue.id)
            elif any(mention.search(c) for c in contents):
                redact[dialogue.id] = [
                    {**m, "content": mention.sub("@someone", str(m.get("content") or ""))}
                    for m in dialogue.messages
                ]
        ratings = await db.execute(sql.DELETE_USER_FEEDBACK_IN_GUILD, (author_id, guild_id))
        await db.executemany(sql.DELETE_DIALOGUE, [(i,) for i in doomed])
        gone = [t.id for t in mine] + sorted(replies)
        await db.executemany(sql.DELETE_TURN, [(i,) for i in gone])
        mentioned = [
            (changed, int(r[0]))
            for r in await db.execute_fetchall(
                sql.SELECT_GUILD_TURNS_MENTIONING, (author_id, guild_id)
            )
            if (changed := mention.sub("@someone", str(r[1]))) != r[1]
        ]
        await db.executemany(sql.UPDATE_TURN_CONTENT, mentioned)
        await db.executemany(
            sql.UPDATE_DIALOGUE_MESSAGES,
            [(json.dumps(m, ensure_ascii=False), i) for i, m in redact.items()],
        )
        jobs = await db.execute(sql.UNLINK_RETRAIN_REQUESTER_IN_GUILD, (author_id, guild_id))
        if gone or doomed or mentioned or redact:
            # a summary of turns that held their id may repeat it: it goes with the rest
            await db.execute(sql.DELETE_GUILD_SUMMARIES, (guild_id,))
        await db.commit()
        persona_of = {d.id: d.persona for d in dialogues}
        return Forgotten(
            turns=len(mine),
            dialogues=len(doomed),
            ratings=ratings.rowcount,
            replies=len(replies),
            mentions=len(mentioned) + len(redact),
            jobs=jobs.rowcount,
            texts=tuple(t.content for t in mine),
            row_ids=frozenset(f"{persona_of[i]}_{i}" for i in doomed if i in persona_of),
        )

    # -- members' edited and deleted messages (`bot.core.edits` says why this way) ----------

    async def erase_messages(
        self, guild_id: str, channel_id: str, message_ids: Iterable[str]
    ) -> Erased:
        """Delete the turns stored from these messages of members, in one channel of one
        guild, with what was written from them, in one transaction: the persona replies that
        answered them (as forget-me finds them), those replies' ratings, the approved
        dialogues that hold any of these turns, and the channel's summaries that cover them
        (rebuilt from the turns left). Ids that are no member's message of that channel are
        ignored: the bot's own replies, another channel's or guild's messages, unknown ids."""
        async with self._deleting:
            turns = await self._member_turns(guild_id, channel_id, message_ids)
            if not turns:
                return Erased()
            db = self.db
            try:
                rows = await db.execute_fetchall(
                    sql.SELECT_REPLIES_TO_TURNS, (json.dumps([t.id for t in turns]),)
                )
                replies = [Turn.from_row(r) for r in rows]
                gone = [*turns, *replies]
                doomed = await self._dialogues_holding(channel_id, gone)
                ratings = await db.execute(
                    sql.DELETE_FEEDBACK_ON_TURNS, (json.dumps([t.id for t in replies]),)
                )
                await db.executemany(sql.DELETE_DIALOGUE, [(i,) for i in doomed])
                await db.executemany(sql.DELETE_TURN, [(t.id,) for t in gone])
                summaries = await db.execute(
                    sql.DELETE_CHANNEL_SUMMARIES_FROM, (channel_id, turns[0].id)
                )
                await db.commit()
            except BaseException:
                # (not left in the connection's open transaction for the next commit to keep
                # half done)
                await db.rollback()
                raise
        return Erased(
            tuple(turns), tuple(replies), len(doomed), ratings.rowcount, summaries.rowcount
        )

    async def rewrite_message(
        self, guild_id: str, channel_id: str, message_id: str, content: str
    ) -> Rewritten | None:
        """Give the turn stored from a member's message (in one channel of one guild) the
        message's edited text, in one transaction: its cached token count goes (it counted
        the old text), the channel's summaries that cover it are dropped (rebuilt from the
        turns as they are now) and the approved dialogues that hold its old text are deleted.
        None when the message is no member's turn there; nothing is written when the text is
        what the turn holds. `content` is the text as a new message would be stored; an edit
        that leaves no text is a deletion (`erase_messages`)."""
        content = clean_text(content)
        if blank(content):
            raise ValueError("an edited message without text is erased, not rewritten")
        async with self._deleting:
            found = await self._member_turns(guild_id, channel_id, [message_id])
            if not found:
                return None
            before = found[0]
            if content == before.content:
                return Rewritten(before, before)
            db = self.db
            try:
                doomed = await self._dialogues_holding(channel_id, [before])
                await db.executemany(sql.DELETE_DIALOGUE, [(i,) for i in doomed])
                await db.execute(sql.UPDATE_TURN_TEXT, (content, before.id))
                summaries = await db.execute(
                    sql.DELETE_CHANNEL_SUMMARIES_FROM, (channel_id, before.id)
                )
                await db.commit()
            except BaseException:
                await db.rollback()
                raise
        after = replace(before, content=content, token_count=None)
        return Rewritten(before, after, len(doomed), summaries.rowcount)

    async def repoint_message(
        self,
        guild_id: str,
        channel_id: str,
        message_id: str,
        *,
        to_message_id: str,
        content: str,
        author_name: str,
    ) -> Rewritten | None:
        """The member's message `message_id` (in one channel of one guild) was re-posted by a
        proxy bot as `to_message_id` and deleted: its turn follows the re-post, in one
        transaction. It takes the re-post's id (so that the re-post's own edits and deletion
        are followed), its text (`content`, the proxy tags cut) and its name (`author_name`,
        the character speaking); the author id stays the member's, so forget-me still finds
        it. As for an edit, the cached token count goes, and the channel's summaries that
        cover the turn and the approved dialogues that hold its old text are dropped.
        None when the message is no member's turn there."""
        content = clean_text(content)
        if blank(content):
            raise ValueError("a proxied message without text is no proxy")
        async with self._deleting:
            found = await self._member_turns(guild_id, channel_id, [message_id])
            if not found:
                return None
            before = found[0]
            after = replace(
                before,
                message_id=to_message_id,
                content=content,
                author_name=clean_text(author_name),
                token_count=None,
            )
            db = self.db
            try:
                doomed = await self._dialogues_holding(channel_id, [before])
                await db.executemany(sql.DELETE_DIALOGUE, [(i,) for i in doomed])
                await db.execute(
                    sql.UPDATE_TURN_PROXIED,
                    (after.message_id, after.content, after.author_name, before.id),
                )
                summaries = await db.execute(
                    sql.DELETE_CHANNEL_SUMMARIES_FROM, (channel_id, before.id)
                )
                await db.commit()
            except BaseException:
                await db.rollback()
                raise
        return Rewritten(before, after, len(doomed), summaries.rowcount)

    async def member_turns(
        self, guild_id: str, channel_id: str, message_ids: Iterable[str]
    ) -> list[Turn]:
        """The turns stored from these members' messages of the channel, oldest first."""
        return await self._member_turns(guild_id, channel_id, message_ids)

    async def _member_turns(
        self, guild_id: str, channel_id: str, message_ids: Iterable[str]
    ) -> list[Turn]:
        """The turns stored from these members' messages of the channel, oldest first."""
        ids = json.dumps(list(dict.fromkeys(str(m) for m in message_ids)))
        rows = await self.db.execute_fetchall(
            sql.SELECT_MEMBER_TURNS_BY_MESSAGES, (ids, channel_id, guild_id)
        )
        return [Turn.from_row(r) for r in rows]

    async def _dialogues_holding(self, channel_id: str, turns: Sequence[Turn]) -> list[int]:
        """The ids of the channel's approved dialogues that hold one of these turns: that
        approve it, or whose messages copied it (its author and its text, as approving
        froze them; a persona reply has no author)."""
        rows = await self.db.execute_fetchall(
            sql.SELECT_CHANNEL_DIALOGUES_FROM, (channel_id, min(t.id for t in turns))
        )
        approved = {t.id for t in turns}
        said = {(t.author_id, t.content) for t in turns}
        return [
            d.id
            for d in map(Dialogue.from_row, rows)
            if d.turn_id in approved
            or any((m.get("author_id"), m.get("content")) in said for m in d.messages)
        ]

    async def retrain_workdirs(self) -> list[Path]:
        """The work directories retrain jobs recorded (forget-me searches them)."""
        rows = await self.db.execute_fetchall(sql.SELECT_RETRAIN_WORKDIRS)
        return [Path(str(r[0])) for r in rows]

    async def compact(self) -> bool:
        """Rebuild the database file without free pages and fold the write-ahead log into it,
        emptying the log: no earlier version of a page, with text since deleted, stays on
        disk. False when another process kept the file busy (it is done next time)."""
        await self.db.commit()
        try:
            await self.db.execute(sql.VACUUM)
        except sqlite3.OperationalError as exc:
            log.warning("could not vacuum the database: %s", exc)
        async with self.db.execute(sql.CHECKPOINT_TRUNCATE) as cursor:
            row = await cursor.fetchone()
        busy = bool(row and row[0])
        if busy:
            log.warning("the write-ahead log could not be emptied: another connection reads it")
        return not busy

    # -- rolling summaries ----------------------------------------------------------------

    async def summary(self, channel_id: str, persona: str) -> Summary | None:
        async with self.db.execute(sql.SELECT_SUMMARY, (channel_id, persona)) as cursor:
            row = await cursor.fetchone()
        return Summary(*row) if row else None

    async def set_summary(
        self,
        channel_id: str,
        persona: str,
        content: str,
        *,
        through_id: int,
        token_count: int | None = None,
        covers: Sequence[int] = (),
        extends: Summary | None = None,
    ) -> Summary:
        """Store the persona's summary of the channel's turns up to `through_id`.

        `covers`: the turns it was written from; `extends`: the summary it folds them into.
        When one of those turns was deleted while it was written (a reset, forget-me), or that
        summary is no longer the channel's (forget-me drops the summaries that may hold a
        member's words), nothing is stored and ConversationGoneError says so."""
        async with self._deleting:
            await self._require_turns(covers)
            if extends is not None:
                kept = await self.summary(channel_id, persona)
                if kept is None or (kept.content, kept.through_id) != (
                    extends.content,
                    extends.through_id,
                ):
                    raise ConversationGoneError()
            now = time.time()
            content = clean_text(content)
            await self._ensure_channel(channel_id)
            await self.db.execute(
                sql.UPSERT_SUMMARY, (channel_id, persona, content, through_id, token_count, now)
            )
            await self.db.commit()
        return Summary(content, through_id, token_count, now)

    async def set_summary_token_count(
        self, channel_id: str, persona: str, through_id: int, count: int
    ) -> None:
        await self.db.execute(
            sql.UPDATE_SUMMARY_TOKEN_COUNT, (count, channel_id, persona, through_id)
        )
        await self.db.commit()
