"""The bot's typed errors. Each says what the user can do; the edges (terminal, Discord) show
`str(error)` as the user-facing message and log anything else with its traceback."""

from __future__ import annotations

from bot.core.text import clean_text


class RolecastError(Exception):
    """Base class: an error whose message is fit to show to a user."""


class PersonaNotFoundError(RolecastError):
    def __init__(self, name: str, known: list[str]) -> None:
        listing = ", ".join(sorted(known)) or "none"
        super().__init__(f"No persona named {name!r}. Known personas: {listing}.")
        self.name = name


class CardError(RolecastError):
    """A character card that cannot be used; `problems` lists what is wrong, field by field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        # A file name or a card's text may hold characters no terminal can print.
        source = clean_text(source)
        problems = [clean_text(p) for p in problems]
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid character card {source}:\n{lines}")
        self.source = source
        self.problems = problems


class ModelServerError(RolecastError):
    """The model server is down, unreachable, or keeps failing after retries."""


class InputTooLongError(RolecastError):
    """A user turn that cannot fit the model's context even with no history."""


class PromptBudgetError(RolecastError):
    """The persona's card, or the reply's max_tokens, leaves no room in the model's context:
    no message can be answered until one of them changes (the member's message is kept)."""


class ConversationGoneError(RolecastError):
    """A reply (or a summary, an approval) finished after what it was written from was
    deleted (a memory reset, a member's forget-me, a member deleting their message): it is not
    kept."""

    # Under what was already shown of such a reply.
    NOTE = "not kept: what it answers was deleted while the reply was being written"

    def __init__(self) -> None:
        super().__init__(
            "What this reply answers was deleted while it was being written (a memory reset, "
            "or a message deleted), so the reply is not kept."
        )


class SceneFullError(RolecastError):
    """A persona cannot join a scene that has as many members as it may."""

    def __init__(self, count: int) -> None:
        super().__init__(
            f"This channel's scene has {count} personas, the most it can have; remove one first."
        )


class ModelAnswerError(ModelServerError):
    """The model server answered with something the bot cannot read: a body that is not JSON
    or of the wrong shape, or a stream that broke before any reply text."""
