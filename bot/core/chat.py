"""The chat core: one user turn in, one persona reply out, both kept in memory.

The terminal chat and the Discord cogs drive this same object. Order matters for not losing
anything: the user's turn is committed to SQLite before the model server is asked, so a down
server costs the user a retry, never their words. The reply is committed once, with what goes
with it (the user turn's settled token count, the messages it was posted as).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot.core.client import Completion, ModelClient, ending_note
from bot.core.memory import Memory, Turn
from bot.core.personas import Persona, PersonaRegistry
from bot.core.prompt import Prompt, PromptBuilder, substitute
from bot.errors import InputTooLongError, RolecastError
from bot.settings import SamplingSettings
from formats.basemodel import SHIPPED_NAME
from formats.registry import parse_served_name

log = logging.getLogger(__name__)

# Posts a finished reply's text where it belongs, with a short note when the reply did not
# finish ("cut at the token limit", "reply interrupted"); returns the ids of the messages it
# became.
Deliver = Callable[[str, str | None], Awaitable[Sequence[str]]]


@dataclass(frozen=True)
class Speaker:
    """Who wrote a user turn."""

    id: str
    name: str


@dataclass(frozen=True)
class Reply:
    """A finished reply: the stored turn and what the server reported about it."""

    turn: Turn
    completion: Completion
    prompt: Prompt


class ChatService:
    def __init__(
        self,
        memory: Memory,
        personas: PersonaRegistry,
        client: ModelClient,
        *,
        prompts: PromptBuilder | None = None,
    ) -> None:
        self.memory = memory
        self.personas = personas
        self.client = client
        self.prompts = prompts or PromptBuilder(memory, client)

    async def aclose(self) -> None:
        """Finish background work; call before closing the client and the database."""
        await self.prompts.aclose()

    async def persona(self, channel_id: str) -> Persona | None:
        """The channel's active persona, or None when none is set (or it was removed)."""
        return self.persona_by_key((await self.memory.channel(channel_id)).persona)

    def persona_by_key(self, key: str | None) -> Persona | None:
        """The persona a channel's stored key names, or None (none set, or it was removed)."""
        if key is None or key not in self.personas:
            return None
        return self.personas.get(key)

    async def require_persona(self, channel_id: str) -> Persona:
        persona = await self.persona(channel_id)
        if persona is None:
            raise RolecastError(
                "No persona is active here. Choose one first "
                f"(known: {', '.join(self.personas.shared_keys())})."
            )
        return persona

    async def set_persona(
        self, channel_id: str, key: str, *, user_name: str = "User"
    ) -> Turn | None:
        """Make `key` the channel's persona. Returns its greeting turn when the card has a
        `first_mes` and this persona has never spoken in the channel."""
        persona = self.personas.get(key)
        await self.memory.set_persona(channel_id, persona.key)
        if not persona.card.data.first_mes.strip():
            return None
        if await self.memory.recent_turns(channel_id, persona.key, limit=1):
            return None
        greeting = substitute(persona.card.data.first_mes, char=persona.name, user=user_name)
        return await self.memory.add_turn(
            channel_id, persona=persona.key, role="assistant", content=greeting
        )

    async def send(
        self,
        channel_id: str,
        text: str,
        speaker: Speaker,
        sampling: SamplingSettings,
        *,
        message_id: str | None = None,
    ) -> AsyncIterator[str | Reply]:
        """Store the user's turn, then stream the persona's reply: text deltas, then a Reply."""
        persona = await self.require_persona(channel_id)
        text = text.strip()
        if not text:
            raise RolecastError("Empty message: nothing to send.")
        turn = await self.memory.add_turn(
            channel_id,
            persona=persona.key,
            role="user",
            content=text,
            author_id=speaker.id,
            author_name=speaker.name,
            message_id=message_id,
        )
        try:
            async for event in self.respond(
                channel_id, sampling, user_name=speaker.name, persona=persona
            ):
                yield event
        except InputTooLongError:
            # The turn can never be answered; keeping it would only block the history.
            await self.memory.delete_turn(turn.id)
            raise

    async def served_by(self, persona: Persona) -> str:
        """The served model `persona` speaks through now (see `ModelClient.model_for`)."""
        return await self.client.model_for(persona.key, shipped=persona.builtin)

    async def respond(
        self,
        channel_id: str,
        sampling: SamplingSettings,
        *,
        user_name: str = "User",
        persona: Persona | None = None,
        deliver: Deliver | None = None,
    ) -> AsyncIterator[str | Reply]:
        """Stream a reply to the channel as it stands (also used to retry after a failure).

        `persona` is the channel's active persona when the caller has just read it. `deliver`
        posts the finished text before the reply is stored, so that the messages it became
        are stored with it; a reply that could not be delivered is not stored."""
        if persona is None:
            persona = await self.require_persona(channel_id)
        model = await self.served_by(persona)
        prompt = await self.prompts.build(
            channel_id,
            persona.card,
            persona.key,
            model=model,
            max_tokens=sampling.max_tokens,
            user_name=user_name,
        )
        completion: Completion | None = None
        async for event in self.client.stream_chat(model, prompt.messages, sampling):
            if isinstance(event, Completion):
                completion = event
            else:
                yield event
        assert completion is not None
        settled = self.prompts.settled(prompt, completion.prompt_tokens)
        text = completion.text.strip()
        if not text:
            if settled:
                await self.memory.set_token_counts(settled)
            raise RolecastError(
                "The model returned an empty reply; try /retry or a higher temperature."
            )
        # A reply that did not finish is kept (it was shown) but never as a complete one: it
        # is stored with how it ended and marked wherever it is shown.
        note = ending_note(completion.finish_reason, completion.complete)
        # Stop strings cut the text short of the tokens generated: count such replies.
        exact = not sampling.stop and completion.problem is None
        cost = self.prompts.reply_cost(model, completion, text) if exact else None
        posted = await deliver(text, note) if deliver is not None else ()
        turn = await self.memory.add_turn(
            channel_id,
            persona=persona.key,
            role="assistant",
            content=text,
            model=completion.model,
            token_count=cost,
            posted_as=posted,
            counts=settled,
            finish_reason=completion.finish_reason,
            complete=completion.complete,
        )
        if cost is None:
            learn = exact and text == completion.text
            self.prompts.count_soon(model, turn, completion if learn else None)
        yield Reply(turn, completion, prompt)

    async def history(self, channel_id: str, *, limit: int = 20) -> list[Turn]:
        """The newest `limit` turns of the active persona, oldest first."""
        persona = await self.require_persona(channel_id)
        turns = await self.memory.recent_turns(channel_id, persona.key, limit=limit)
        return list(reversed(turns))

    async def last_turn(self, channel_id: str) -> Turn | None:
        persona = await self.require_persona(channel_id)
        turns = await self.memory.recent_turns(channel_id, persona.key, limit=1)
        return turns[0] if turns else None

    async def reset(self, channel_id: str) -> int:
        """Forget the channel's conversation (every persona's). Returns the turns deleted."""
        return await self.memory.clear_channel(channel_id)


def describe_model(served: str) -> str:
    """What a served model name means, for people: a published version, the shipped adapter or
    the base model."""
    if parse_served_name(served):
        return f"{served} (its published adapter)"
    if served == SHIPPED_NAME:
        return f"{served} (the adapter that ships with Rolecast)"
    return f"{served} (the base model, no adapter)"
