"""Rolling summaries: memory beyond the prompt's window.

When a channel's history no longer fits the token budget, the turns that fell out of the
prompt (older than the oldest turn it still carries, newer than what the summary covers) are
folded into the channel's summary by the model, a bounded batch at a time. The prompt then
carries the summary in place of those turns (`PromptBuilder`), and `/memory show` shows it.
A summary that finishes after a reset or forget-me deleted what it was written from (a turn it
covers, the summary it extends) is not kept (`Memory.set_summary`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from bot.core.client import Completion, Message, ModelClient
from bot.core.memory import Memory, Summary, Turn
from bot.core.prompt import Prompt
from bot.errors import ConversationGoneError, ModelServerError
from bot.settings import SamplingSettings

log = logging.getLogger(__name__)

INSTRUCTION = (
    "You keep the memory of a role-play conversation. Rewrite the summary so that it also "
    "covers the new lines: who is who, what happened, promises, names, places, feelings and "
    "anything the characters would remember. Write plain prose in the language of the "
    "conversation, at most {words} words. Reply with the summary only."
)


def transcript(
    turns: list[Turn],
    persona_name: str,
    *,
    max_chars: int = 600,
    names: Mapping[str, str] | None = None,
) -> str:
    """The turns as `Name: text` lines; in a scene, each reply under its persona's name."""
    lines = []
    for turn in turns:
        if turn.role == "assistant":
            who = (names or {}).get(turn.persona, persona_name)
        else:
            who = turn.author_name or "User"
        text = " ".join(turn.content.split())
        if len(text) > max_chars:
            text = text[:max_chars] + "…"
        lines.append(f"{who}: {text}")
    return "\n".join(lines)


class Summarizer:
    def __init__(
        self,
        memory: Memory,
        client: ModelClient,
        *,
        max_tokens: int = 256,
        batch_turns: int = 40,
        temperature: float = 0.3,
    ) -> None:
        self.memory = memory
        self.client = client
        self.max_tokens = max_tokens
        self.batch_turns = batch_turns
        self.sampling = SamplingSettings(
            temperature=temperature, top_p=0.9, max_tokens=max_tokens, repetition_penalty=1.05
        )

    async def _base_model(self) -> str:
        models = await self.client.models()
        bases = [m.id for m in models if m.parent is None] or [m.id for m in models]
        if not bases:
            raise ModelServerError("The model server serves no model.")
        return bases[0]

    def request(
        self,
        previous: str | None,
        turns: list[Turn],
        persona_name: str,
        *,
        names: Mapping[str, str] | None = None,
    ) -> list[Message]:
        words = max(self.max_tokens // 2, 40)
        parts = []
        if previous:
            parts.append(f"Summary so far:\n{previous}")
        parts.append(f"New lines:\n{transcript(turns, persona_name, names=names)}")
        return [
            {"role": "system", "content": INSTRUCTION.format(words=words)},
            {"role": "user", "content": "\n\n".join(parts)},
        ]

    async def update(
        self,
        channel_id: str,
        persona: str,
        persona_name: str,
        prompt: Prompt,
        *,
        cast: Mapping[str, str] | None = None,
    ) -> Summary | None:
        """Fold the turns that fell out of `prompt` into the summary (one batch). Returns the
        new summary, or None when nothing needed summarising or what it was written from was
        deleted meanwhile (a reset, forget-me). In a scene, `cast` names its members by key:
        the persona's summary then covers the whole cast's turns."""
        if not prompt.history_truncated or prompt.oldest_included_id is None:
            return None
        scene = cast is not None and len(cast) > 1
        names = cast if cast is not None and scene else None
        previous = await self.memory.summary(channel_id, persona)
        after = previous.through_id if previous is not None else 0
        turns = await self.memory.turns_between(
            channel_id,
            tuple(names) if names else persona,
            after_id=after,
            before_id=prompt.oldest_included_id,
            limit=self.batch_turns,
        )
        if not turns:
            return None
        model = await self._base_model()
        # Keep the request inside the model's context: drop the newest turns of the batch
        # until it fits (they are summarised next time).
        while True:
            messages = self.request(
                previous.content if previous else None, turns, persona_name, names=names
            )
            count = await self.client.tokenize(model, messages, add_generation_prompt=True)
            if count.count + self.max_tokens <= count.max_model_len or len(turns) == 1:
                break
            turns = turns[: max(len(turns) // 2, 1)]
        text = ""
        async for event in self.client.stream_chat(model, messages, self.sampling):
            if isinstance(event, Completion):
                if event.problem is not None:  # its stream broke: not a summary to keep
                    log.warning("channel %s: summary not kept: %s", channel_id, event.problem)
                    return None
                text = event.text.strip()
        if not text:
            log.warning("channel %s: the model returned an empty summary", channel_id)
            return None
        try:
            summary = await self.memory.set_summary(
                channel_id,
                persona,
                text,
                through_id=turns[-1].id,
                covers=[t.id for t in turns],
                extends=previous,
            )
        except ConversationGoneError:
            log.info("channel %s: summary not kept: the conversation was deleted", channel_id)
            return None
        log.info(
            "channel %s: summary of %s now covers turns up to %d (%d new)",
            channel_id,
            persona,
            turns[-1].id,
            len(turns),
        )
        return summary
