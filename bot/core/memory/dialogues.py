"""Feedback on replies (ratings) and approved dialogues, the training data frozen from
them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from typing import Literal

import aiosqlite

from bot.core import sql
from bot.core.memory.records import Dialogue, Turn
from bot.errors import ConversationGoneError


class DialoguesMixin:
    """`Memory`'s ratings and approved dialogues."""

    db: aiosqlite.Connection
    _deleting: asyncio.Lock

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
