"""Taking a person's words out: forget-me (`forget_author`), members' deleted, edited and
proxied messages (`erase_messages`, `rewrite_message`, `repoint_message`), and
compacting the file so that deleted text leaves the disk (`compact`)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import aiosqlite

from bot.core import sql
from bot.core.memory.records import Dialogue, Erased, Forgotten, Rewritten, Turn
from bot.core.quotes import Quotes
from bot.core.text import blank, clean_text

log = logging.getLogger(__name__)


class ForgettingMixin:
    """`Memory`'s forget-me and members' deleted, edited and proxied messages (each deletes
    or rewrites while holding `_deleting`), and compacting the file."""

    db: aiosqlite.Connection
    _deleting: asyncio.Lock

    # -- forget-me -------------------------------------------------------------------------

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
            turns = await self.member_turns(guild_id, channel_id, message_ids)
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
            found = await self.member_turns(guild_id, channel_id, [message_id])
            if not found:
                return None
            before = found[0]
            if content == before.content:
                return Rewritten(before, before)
            after = replace(before, content=content, token_count=None)
            return await self._replace_turn(
                channel_id, before, after, sql.UPDATE_TURN_TEXT, (content, before.id)
            )

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
            found = await self.member_turns(guild_id, channel_id, [message_id])
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
            update = (after.message_id, after.content, after.author_name, before.id)
            return await self._replace_turn(
                channel_id, before, after, sql.UPDATE_TURN_PROXIED, update
            )

    async def _replace_turn(
        self,
        channel_id: str,
        before: Turn,
        after: Turn,
        statement: str,
        parameters: Sequence[object],
    ) -> Rewritten:
        """A turn's text changed (an edit, a proxy's re-post), in one transaction: `statement`
        writes it, the approved dialogues that hold its old text and the channel's summaries
        that cover it go. The caller holds the deletion lock."""
        db = self.db
        try:
            doomed = await self._dialogues_holding(channel_id, [before])
            await db.executemany(sql.DELETE_DIALOGUE, [(i,) for i in doomed])
            await db.execute(statement, parameters)
            summaries = await db.execute(sql.DELETE_CHANNEL_SUMMARIES_FROM, (channel_id, before.id))
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        return Rewritten(before, after, len(doomed), summaries.rowcount)

    async def member_turns(
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
