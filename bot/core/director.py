"""Playing a scene: the replies to one member's message, in order, and the chain after them.

`Director.play` takes a stored message and the members that answer it (`ChatService.hear`):

- Every addressed member answers once. Their requests go to the model server together (the
  embedded server batches requests of different adapters, as vLLM does), but their replies are
  shown and stored one after another, in the order `hear` gave: a reply is shown once the one
  before it is stored (or failed), so turn ids, the channel and the terminal agree on the order.
- Then the chain: the newest reply that names another member hands that member the turn, as
  long as the bot turns since the member's message (the replies to it count) stay under the
  channel's `chain_limit`; then the scene waits for a person.
- `interrupt` (a person spoke) ends the chain: a chain reply still being written is cancelled,
  the part already shown is kept and marked as interrupted, never stored as complete, and no
  further one starts. A reply whose text is complete is posted and stored whole: it is past
  being interrupted. Replies to the member's message itself are never cut off.

The front end shows replies through a `Stage` (webhook messages on Discord, lines in the
terminal) and hears of each reply and failure through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bot.core.chat import ChatService, Reply
from bot.core.client import ending_note
from bot.core.memory import Turn
from bot.core.personas import Persona
from bot.core.scene import Scene
from bot.errors import ConversationGoneError
from bot.settings import SamplingSettings

log = logging.getLogger(__name__)


class Performance(Protocol):
    """One reply as the front end shows it."""

    async def feed(self, delta: str) -> None:
        """Show more of the reply as it is written."""

    async def finish(self, text: str, note: str | None) -> Sequence[str]:
        """Show the whole reply (with `note` when it did not finish); returns the ids of the
        messages it became."""

    async def cut(self, note: str) -> Sequence[str]:
        """Stop showing a reply cut off while being written: mark what was shown with
        `note`; returns the ids of the messages shown (none: nothing was)."""


async def mark_discarded(performance: Performance, key: str) -> bool:
    """A reply whose conversation was deleted while it was written (a reset, forget-me, a
    member deleting the message it answers) is not kept: mark what was shown of it so, rather
    than leave it looking like any other reply. False when nothing of it was shown (or the
    mark could not be made): the member is told."""
    try:
        return bool(await performance.cut(ConversationGoneError.NOTE))
    except Exception as exc:
        log.warning("channel %s: a discarded reply was not marked: %s", key, exc)
        return False


class Stage(Protocol):
    """Where a scene's replies are shown: the front end."""

    def perform(self, persona: Persona) -> Performance:
        """A place for `persona`'s next reply."""

    async def replied(self, persona: Persona, reply: Reply) -> None:
        """A reply was shown and stored."""

    async def failed(self, persona: Persona, error: Exception) -> None:
        """A reply could not be written or shown (nothing of it was stored)."""


@dataclass
class _Line:
    """One reply being written."""

    persona: Persona
    performance: Performance
    fed: list[str] = field(default_factory=list)
    committing: bool = False  # the text is complete: it is being posted and stored
    task: asyncio.Task[Reply | None] | None = None


class Director:
    """Plays one member's message through a scene (one director per message)."""

    def __init__(
        self,
        chat: ChatService,
        channel_id: str,
        scene: Scene,
        stage: Stage,
        *,
        sampling: Callable[[Persona], SamplingSettings],
        user_name: str = "User",
    ) -> None:
        self.chat = chat
        self.channel_id = channel_id
        self.scene = scene
        self.stage = stage
        self.sampling = sampling
        self.user_name = user_name
        self.interrupted = False
        self._chained: _Line | None = None

    def interrupt(self) -> None:
        """A person spoke: end the chain (see the module's docstring)."""
        self.interrupted = True
        line = self._chained
        if line is not None and line.task is not None and not line.committing:
            line.task.cancel()

    async def play(
        self, turn: Turn, answering: Sequence[Persona], *, redo: Turn | None = None
    ) -> list[Reply]:
        """Answer `turn` (a member's stored message) by `answering`, then chain; returns the
        replies stored, in order. `redo`: the reply of one persona answering that its new one
        replaces once stored (`ChatService.respond`)."""
        replies = await self._answer_together(turn, answering, redo)
        bot_turns = len(replies)
        while replies and bot_turns < self.scene.chain_limit and not self.interrupted:
            last = replies[-1]
            target = self.scene.handed_to(last.turn.content, last.turn.persona)
            if target is None:
                break
            reply = await self._chain(turn, target)
            if reply is None:
                break
            replies.append(reply)
            bot_turns += 1
        return replies

    async def _answer_together(
        self, turn: Turn, answering: Sequence[Persona], redo: Turn | None = None
    ) -> list[Reply]:
        if len(answering) == 1:  # the usual case: no other reply to wait for
            line = _Line(answering[0], self.stage.perform(answering[0]))
            reply = await self._write(line, turn, redo=redo)
            return [reply] if reply is not None else []
        assert redo is None, "a reply is written again by one persona"
        previous: asyncio.Event | None = None
        tasks = []
        for persona in answering:
            done = asyncio.Event()
            line = _Line(persona, self.stage.perform(persona))
            tasks.append(asyncio.create_task(self._write(line, turn, after=previous, done=done)))
            previous = done
        results = await asyncio.gather(*tasks)
        return [r for r in results if r is not None]

    async def _chain(self, turn: Turn, persona: Persona) -> Reply | None:
        line = _Line(persona, self.stage.perform(persona))
        line.task = asyncio.create_task(self._write(line, turn))
        self._chained = line
        try:
            return await line.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self.interrupted or (current is not None and current.cancelling()):
                raise  # the whole play was cancelled, not this reply
            await self._keep_cut(line, turn)
            return None
        finally:
            self._chained = None

    async def _keep_cut(self, line: _Line, turn: Turn) -> None:
        """A chain reply interrupted while being written: what it showed stays, marked."""
        note = ending_note(None, False)
        assert note is not None
        try:
            posted = await line.performance.cut(note)
        except Exception as exc:
            log.warning("channel %s: an interrupted reply was not marked: %s", self.channel_id, exc)
            posted = ()
        if posted:
            kept = await self.chat.keep_interrupted(
                self.channel_id,
                line.persona,
                "".join(line.fed),
                posted_as=posted,
                prompted_by=turn.id,
            )
            log.info(
                "channel %s: %s's reply interrupted (%s)",
                self.channel_id,
                line.persona.key,
                f"turn {kept.id}" if kept else "nothing kept",
            )

    async def _write(
        self,
        line: _Line,
        turn: Turn,
        *,
        after: asyncio.Event | None = None,
        done: asyncio.Event | None = None,
        redo: Turn | None = None,
    ) -> Reply | None:
        """One member's reply: written at once, shown and stored after the one before it."""
        pending: list[str] = []
        performance = line.performance

        async def show(delta: str) -> None:
            line.fed.append(delta)
            if after is not None and not after.is_set():
                pending.append(delta)
                return
            for held in pending:
                await performance.feed(held)
            pending.clear()
            await performance.feed(delta)

        async def deliver(text: str, note: str | None) -> Sequence[str]:
            line.committing = True  # before any await: an interrupt no longer cuts it off
            if after is not None:
                await after.wait()
            return await performance.finish(text, note)

        try:
            reply: Reply | None = None
            async for event in self.chat.respond(
                self.channel_id,
                self.sampling(line.persona),
                user_name=self.user_name,
                persona=line.persona,
                deliver=deliver,
                scene=self.scene,
                prompted_by=turn.id,
                redo=redo,
            ):
                if isinstance(event, Reply):
                    reply = event
                else:
                    await show(event)
            assert reply is not None
            await self.stage.replied(line.persona, reply)
            return reply
        except Exception as exc:
            if after is not None:
                await after.wait()  # failures are told in order too
            if isinstance(exc, ConversationGoneError) and await mark_discarded(
                performance, self.channel_id
            ):
                return None
            await self.stage.failed(line.persona, exc)
            return None
        finally:
            if done is not None:
                done.set()
