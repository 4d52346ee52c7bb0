"""Approvals: members mark good persona replies; an approved reply, with the turns before it,
is frozen as a training dialogue.

Two ways in: an explicit approval ("Approve for training") and reactions. Ratings are one per
person per reply (+1/-1); a reply whose thumbs-up outnumber its thumbs-down by `threshold`
becomes a dialogue, and stops being one (if reactions alone made it) when that no longer holds.
The dialogue is a snapshot, so a later memory reset does not lose training data; forget-me
deletes the snapshots its caller wrote in, approved, or that quote them (see
`Memory.forget_author`).

In a scene, the snapshot is the approved persona's: its own replies stay its replies, and the
other personas' replies are turns of the conversation under their names (`"persona"` marks
them), as its prompt showed them; the export trains it on its own replies only.
"""

from __future__ import annotations

import logging
from typing import Literal

from bot.core.memory import Dialogue, Memory, Turn
from bot.core.personas import PersonaRegistry
from bot.errors import ConversationGoneError, RolecastError

log = logging.getLogger(__name__)


class Approvals:
    def __init__(
        self,
        memory: Memory,
        *,
        context_turns: int = 8,
        threshold: int = 1,
        personas: PersonaRegistry | None = None,
    ) -> None:
        self.memory = memory
        self.context_turns = context_turns
        self.threshold = threshold
        self.personas = personas

    def _name(self, key: str) -> str:
        if self.personas is not None and key in self.personas:
            return self.personas.get(key).name
        return key

    async def snapshot(self, turn: Turn) -> list[dict[str, str | None]]:
        """The approved reply and up to `context_turns` turns before it, oldest first (in a
        scene, the turns of the channel's cast)."""
        return self._messages(turn, await self._context(turn))

    async def _context(self, turn: Turn) -> list[Turn]:
        """The turns a snapshot of `turn` is made of: up to `context_turns` before it, oldest
        first, then the reply itself."""
        cast = await self.memory.cast(turn.channel_id)
        history: str | tuple[str, ...] = turn.persona
        if len(cast) > 1:
            history = (*cast, turn.persona) if turn.persona not in cast else cast
        before = await self.memory.recent_turns(
            turn.channel_id, history, limit=self.context_turns, before_id=turn.id
        )
        return [*reversed(before), turn]

    async def _freeze(
        self,
        turn: Turn,
        *,
        guild_id: str | None,
        approved_by: str | None,
        source: Literal["command", "reactions"],
    ) -> Dialogue:
        """Store the snapshot of an approved reply, provided that none of its turns was
        deleted or edited while it was taken (ConversationGoneError otherwise): a dialogue
        never keeps words a member has taken back."""
        context = await self._context(turn)
        return await self.memory.add_dialogue(
            turn,
            self._messages(turn, context),
            guild_id=guild_id,
            approved_by=approved_by,
            source=source,
            covers=context,
        )

    def _messages(self, turn: Turn, context: list[Turn]) -> list[dict[str, str | None]]:
        """The snapshot's messages: each turn of `context` as `turn`'s persona saw it."""
        messages: list[dict[str, str | None]] = []
        for t in context:
            if t.role == "assistant" and t.persona != turn.persona:
                # another persona of the scene: a named turn of the conversation
                messages.append(
                    {
                        "role": "user",
                        "content": t.content,
                        "author_id": None,
                        "author_name": self._name(t.persona),
                        "persona": t.persona,
                    }
                )
                continue
            messages.append(
                {
                    "role": t.role,
                    "content": t.content,
                    "author_id": t.author_id,
                    "author_name": t.author_name,
                }
            )
        return messages

    def _check(self, turn: Turn) -> None:
        if turn.role != "assistant":
            raise RolecastError("Only a persona's replies can be approved for training.")
        if not turn.complete and turn.finish_reason != "length":
            # Its stream broke: the text is what arrived, not what the model wrote. (A reply
            # cut at the token limit is shown marked as such; approving it is the approver's
            # call.)
            raise RolecastError(
                "This reply was interrupted before it finished, so it cannot be approved for "
                "training; approve a complete reply instead."
            )

    async def approve(self, turn: Turn, *, by: str, guild_id: str | None) -> tuple[Dialogue, bool]:
        """Approve explicitly. Returns the dialogue and whether it is new."""
        self._check(turn)
        existing = await self.memory.dialogue_for_turn(turn.id)
        if existing is not None:
            return existing, False
        try:
            dialogue = await self._freeze(turn, guild_id=guild_id, approved_by=by, source="command")
        except ConversationGoneError:
            raise RolecastError(
                "A message of this conversation was edited or deleted while the reply was "
                "being approved, so nothing was approved; approve it again."
            ) from None
        log.info("turn %d of %s approved by %s", turn.id, turn.persona, by)
        return dialogue, True

    async def react(
        self,
        turn: Turn,
        user_id: str,
        rating: Literal[-1, 1],
        *,
        added: bool,
        guild_id: str | None,
    ) -> Dialogue | None:
        """Record (or withdraw) a rating; returns the reply's dialogue if it now is one."""
        self._check(turn)
        if added:
            await self.memory.rate(turn.id, user_id, rating)
        else:
            await self.memory.unrate(turn.id, user_id, rating)
        up, down = await self.memory.score(turn.id)
        if up - down >= self.threshold:
            existing = await self.memory.dialogue_for_turn(turn.id)
            if existing is not None:
                return existing
            try:
                return await self._freeze(
                    turn, guild_id=guild_id, approved_by=None, source="reactions"
                )
            except ConversationGoneError:
                # the next reaction on the reply makes it again, from the turns as they are
                log.info("turn %d: not approved, its conversation changed meanwhile", turn.id)
                return None
        await self.memory.withdraw_dialogue(turn.id, "reactions")
        return await self.memory.dialogue_for_turn(turn.id)
