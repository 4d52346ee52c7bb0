"""The chat core: one user turn in, one persona reply out, both kept in memory.

The terminal chat and the Discord cogs drive this same object. Order matters for not losing
anything: the user's turn is committed to SQLite before the model server is asked, so a down
server costs the user a retry, never their words. The reply is committed once, with what goes
with it (the user turn's settled token count, the messages it was posted as).

In a scene (several personas in one channel: `bot.core.scene`), `hear` stores a member's
message with the personas that answer it, and `respond` writes one persona's reply from the
scene's shared history; `bot.core.director` plays several replies and chains out.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot.core.client import Completion, ModelClient, ending_note
from bot.core.memory import Memory, Turn
from bot.core.personas import Persona, PersonaRegistry
from bot.core.prompt import Prompt, PromptBuilder, substitute
from bot.core.scene import Scene
from bot.core.text import blank
from bot.errors import ConversationGoneError, InputTooLongError, RolecastError
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


@dataclass(frozen=True)
class Heard:
    """A member's message in a scene, stored, and the personas that answer it, in order."""

    turn: Turn
    answering: list[Persona]


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
        # channel -> the persona whose reply was stored last (where a scene's turn goes round
        # from); read from the database once per channel, then kept as replies are stored
        self._spoke: dict[str, str] = {}

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
        return await self._greet(channel_id, persona, user_name)

    async def _greet(self, channel_id: str, persona: Persona, user_name: str) -> Turn | None:
        """Store the card's `first_mes` when the persona has never spoken in the channel."""
        if not persona.card.data.first_mes.strip():
            return None
        if await self.memory.recent_turns(channel_id, persona.key, limit=1):
            return None
        greeting = substitute(persona.card.data.first_mes, char=persona.name, user=user_name)
        turn = await self.memory.add_turn(
            channel_id, persona=persona.key, role="assistant", content=greeting
        )
        self._spoke[channel_id] = persona.key
        return turn

    # -- scenes ------------------------------------------------------------------------------

    async def scene(
        self, channel_id: str, *, allowed: Callable[[Persona], bool] = lambda _: True
    ) -> Scene:
        """The channel's cast (a scene of one in a channel with one persona)."""
        settings = await self.memory.channel_settings(channel_id)
        return Scene.of(settings, self.personas, allowed=allowed)

    async def set_cast(
        self, channel_id: str, keys: Sequence[str], *, user_name: str = "User"
    ) -> list[Turn]:
        """Make these personas the channel's cast, in order. Returns the greetings of those
        that never spoke in the channel."""
        cast = [self.personas.get(key) for key in keys]  # unknown keys fail before any change
        await self.memory.set_cast(channel_id, [p.key for p in cast])
        greetings = [await self._greet(channel_id, p, user_name) for p in cast]
        return [g for g in greetings if g is not None]

    async def join(
        self, channel_id: str, key: str, *, user_name: str = "User", most: int | None = None
    ) -> tuple[bool, Turn | None]:
        """Add a persona to the channel's cast: whether it joined (it was not in it), and its
        greeting when it never spoke in the channel. SceneFullError when the cast has `most`
        members already."""
        persona = self.personas.get(key)
        if not await self.memory.add_cast_member(channel_id, persona.key, most=most):
            return False, None
        return True, await self._greet(channel_id, persona, user_name)

    async def greetings(self, channel_id: str, *, user_name: str = "User") -> list[Turn]:
        """The greetings of the cast's members that never spoke in the channel (after a
        reset), in cast order."""
        scene = await self.scene(channel_id)
        greetings = [await self._greet(channel_id, p, user_name) for p in scene.members]
        return [g for g in greetings if g is not None]

    async def leave(self, channel_id: str, key: str) -> bool:
        """Take a persona out of the channel's cast; False when it was not in it."""
        return await self.memory.remove_cast_member(channel_id, key)

    async def hear(
        self,
        channel_id: str,
        text: str,
        speaker: Speaker,
        scene: Scene,
        *,
        answer: bool,
        replied_to: str | None = None,
        message_id: str | None = None,
    ) -> Heard | None:
        """Store a member's message in a scene with the members that answer it: those it
        addresses (`Scene.addressed`), else, when the message calls for an `answer`, the one
        the channel's turn-taking picks. None (nothing stored) when nobody answers."""
        text = "" if blank(text) else text.strip()
        answering = scene.addressed(text, replied_to=replied_to) if text else []
        if not answering and answer and text and scene.members:
            handed = scene.member(scene.next_persona)
            if handed is not None:
                await self.memory.set_next_persona(channel_id, None)
                answering = [handed]
            else:
                last = self._spoke.get(channel_id)
                if last is None:
                    last = await self.memory.last_speaker(channel_id, scene.keys)
                answering = [scene.pick(text, last_speaker=last)]
        if not answering:
            return None
        turn = await self.memory.add_turn(
            channel_id,
            persona=answering[0].key,
            role="user",
            content=text,
            author_id=speaker.id,
            author_name=speaker.name,
            message_id=message_id,
        )
        return Heard(turn, answering)

    async def keep_interrupted(
        self,
        channel_id: str,
        persona: Persona,
        text: str,
        *,
        posted_as: Sequence[str] = (),
        prompted_by: int | None = None,
    ) -> Turn | None:
        """Keep what was shown of a reply cut off before it finished (a member spoke while
        personas were answering one another), marked as interrupted; None when nothing was."""
        text = text.strip()
        if not text:
            return None
        try:
            model: str | None = await self.served_by(persona)
        except RolecastError:
            model = None
        turn = await self.memory.add_turn(
            channel_id,
            persona=persona.key,
            role="assistant",
            content=text,
            model=model,
            posted_as=posted_as,
            finish_reason=None,
            complete=False,
            prompted_by=prompted_by,
            answers=[prompted_by] if prompted_by is not None else [],
        )
        self._spoke[channel_id] = persona.key
        return turn

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
        if blank(text):
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
        scene: Scene | None = None,
        prompted_by: int | None = None,
        redo: Turn | None = None,
    ) -> AsyncIterator[str | Reply]:
        """Stream a reply to the channel as it stands (also used to retry after a failure).

        `persona` is the channel's active persona when the caller has just read it (in a
        `scene`, the member that answers). `deliver` posts the finished text before the reply
        is stored, so that the messages it became are stored with it; a reply that could not
        be delivered is not stored. `prompted_by` is the member's turn it answers. `redo` is a
        reply to write again (`/retry`): the prompt is the channel as it stood before it, and
        it is deleted when the new reply is stored, not before, so a retry that fails keeps
        it."""
        if persona is None:
            persona = await self.require_persona(channel_id)
        model = await self.served_by(persona)
        # Read before the prompt, so that none of them can go unnoticed between the two.
        waiting = await self.memory.unanswered_turns(
            channel_id, persona.key, before_id=redo.id if redo is not None else None
        )
        prompt = await self.prompts.build(
            channel_id,
            persona.card,
            persona.key,
            model=model,
            max_tokens=sampling.max_tokens,
            user_name=user_name,
            cast=scene.names if scene is not None and scene.is_scene else None,
            before_id=redo.id if redo is not None else None,
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
        # What the reply answers: the newest turn it saw, the member's turn it is for, and the
        # members' turns since this persona's last reply that its prompt held (it is the first
        # reply after each: the one a deleted message takes with it). One deleted meanwhile
        # (a reset, forget-me, a member deleting their message) means the reply is neither
        # shown nor kept: it was written from words that are gone.
        answers = [i for i in (prompt.newest_id, prompted_by) if i is not None]
        if prompt.oldest_included_id is not None:
            answers += [i for i in waiting if i >= prompt.oldest_included_id]
        if not await self.memory.all_stored(answers):
            raise ConversationGoneError()
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
            prompted_by=prompted_by,
            answers=answers,
            replaces=redo.id if redo is not None else None,
        )
        self._spoke[channel_id] = persona.key
        if cost is None:
            learn = exact and text == completion.text
            self.prompts.count_soon(model, turn, completion if learn else None)
        yield Reply(turn, completion, prompt)

    async def _history_keys(self, channel_id: str) -> str | tuple[str, ...]:
        """Whose turns make the channel's history: its persona's, or its whole cast's."""
        persona = await self.require_persona(channel_id)
        cast = await self.memory.cast(channel_id)
        return cast if len(cast) > 1 else persona.key

    async def history(self, channel_id: str, *, limit: int = 20) -> list[Turn]:
        """The newest `limit` turns of the active persona (of the cast, in a scene), oldest
        first."""
        keys = await self._history_keys(channel_id)
        turns = await self.memory.recent_turns(channel_id, keys, limit=limit)
        return list(reversed(turns))

    async def last_turn(self, channel_id: str) -> Turn | None:
        keys = await self._history_keys(channel_id)
        turns = await self.memory.recent_turns(channel_id, keys, limit=1)
        return turns[0] if turns else None

    async def reset(self, channel_id: str) -> int:
        """Forget the channel's conversation (every persona's). Returns the turns deleted."""
        self._spoke.pop(channel_id, None)
        return await self.memory.clear_channel(channel_id)


def describe_model(served: str) -> str:
    """What a served model name means, for people: a published version, the shipped adapter or
    the base model."""
    if parse_served_name(served):
        return f"{served} (its published adapter)"
    if served == SHIPPED_NAME:
        return f"{served} (the adapter that ships with Rolecast)"
    return f"{served} (the base model, no adapter)"
