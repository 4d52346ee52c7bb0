"""A channel's settings as Discord admins set them (mode, sampling, guild), the guild's
admin role, and taking a removed persona out of every channel."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Literal

import aiosqlite

from bot.core import sql
from bot.core.memory.records import ChannelSettings

log = logging.getLogger(__name__)


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


class SettingsMixin:
    """`Memory`'s channel settings."""

    db: aiosqlite.Connection

    if TYPE_CHECKING:
        # `Memory`'s own (`store.py`), declared for the type checker
        async def _ensure_channel(self, channel_id: str) -> None: ...

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
