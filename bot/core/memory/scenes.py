"""Scenes: a channel's cast of several personas, who joins and leaves it, how turns go
round it, and who spoke last."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiosqlite

from bot.core import sql
from bot.core.memory.records import ChannelSettings, TurnPolicy
from bot.core.queue import ChannelQueue
from bot.errors import SceneFullError

# How far back the newest reply is looked for, to go round the cast in turn.
LAST_SPEAKER_DEPTH = 64


class ScenesMixin:
    """`Memory`'s scenes: a channel's cast. A channel's cast changes one at a time
    (`_casting`)."""

    db: aiosqlite.Connection
    _casting: ChannelQueue

    if TYPE_CHECKING:
        # `Memory`'s own (`store.py`) and `SettingsMixin`'s, declared for the type checker
        async def _ensure_channel(self, channel_id: str) -> None: ...
        async def _set_persona(self, channel_id: str, persona: str) -> None: ...
        async def channel_settings(self, channel_id: str) -> ChannelSettings: ...

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
