"""Rolling summaries: one per persona and channel, of its turns up to one id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import aiosqlite

from bot.core import sql
from bot.core.memory.records import Summary
from bot.core.text import clean_text
from bot.errors import ConversationGoneError


class SummariesMixin:
    """`Memory`'s rolling summaries."""

    db: aiosqlite.Connection
    _deleting: asyncio.Lock

    if TYPE_CHECKING:
        # `Memory`'s own (`store.py`), declared for the type checker
        async def _ensure_channel(self, channel_id: str) -> None: ...
        async def _require_turns(self, turn_ids: Iterable[int]) -> None: ...

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
