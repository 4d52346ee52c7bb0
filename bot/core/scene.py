"""Scenes: several personas in one channel, and who answers a message there.

A channel's cast is read with its settings (`Memory.channel_settings`); a `Scene` holds the
members that can speak there, in order, with the channel's turn-taking rules. A channel with
one persona is a scene of one, and everything here leaves it as it was before scenes.

Who answers a member's message (`addressed`, then `pick`):

1. the personas it addresses: the one whose message it replies to, then those it names (name,
   first name or key, `@` optional) in the order it names them; each answers once;
2. otherwise, when the message calls for an answer (the bot mentioned, or an `always` channel):
   one persona, never one per member: the one handed the next turn (`next_persona`), else the
   channel's policy: `round-robin` (the member after the last one that spoke) or `keywords`
   (the member whose name, key, tags and lorebook keys the message matches most; round-robin
   among equals and when nothing matches).

A reply that names another member hands that member the turn (`handed_to`); `Director`
(`bot.core.director`) plays that out, for at most `chain_limit` consecutive bot turns.

Names are matched as words in space-separated scripts (`Al` is not in `Alice`) and as text in
scripts without spaces (`春日` is in `春日你好`); a name shorter than two characters is only
matched after `@`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bot.core.memory import ChannelSettings, TurnPolicy
from bot.core.personas import Persona, PersonaRegistry
from bot.settings import SamplingSettings, stored_sampling

# The most consecutive bot turns a channel may allow (replies to a member's message count).
MAX_CHAIN_LIMIT = 10
DEFAULT_CHAIN_LIMIT = 2
POLICIES: tuple[TurnPolicy, ...] = ("round-robin", "keywords")
_MIN_NAME = 2  # shorter names only count after "@"
_MIN_FIRST_NAME = 3  # "Haruhi" of "Haruhi Suzumiya"; not "Al" of "Al Capone"


# Scripts without spaces between words: CJK (with kana) and Hangul syllables.
_UNSPACED = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff"
# A letter or digit of a script that separates words with spaces (Latin, Cyrillic, ...).
_SPACED_WORD = rf"[^\W_{_UNSPACED}]"


def _spaced(char: str) -> bool:
    """Whether a name that starts or ends with `char` must stand as a whole word there."""
    return re.fullmatch(_SPACED_WORD, char) is not None


def _alternative(word: str, *, at_only: bool = False) -> str:
    """A name as a pattern: a whole word in spaced scripts (`Al` is not in `Alice`, `ATRI` is
    in `和ATRI，`), any text in the others (`春日` is in `春日你好`)."""
    escaped = re.escape(word)
    if _spaced(word[0]):
        escaped = rf"(?<!{_SPACED_WORD}){escaped}"
    if _spaced(word[-1]):
        escaped = rf"{escaped}(?!{_SPACED_WORD})"
    return rf"@{escaped}" if at_only else rf"@?{escaped}"


@functools.lru_cache(maxsize=1024)
def _pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive pattern for a persona's names or keywords (cached: every message
    in a scene is matched against every member)."""
    alternatives = [
        _alternative(w, at_only=len(w) < _MIN_NAME)
        for w in sorted(set(words), key=len, reverse=True)
        if w
    ]
    return re.compile("|".join(alternatives), re.IGNORECASE) if alternatives else None


def names_of(persona: Persona) -> tuple[str, ...]:
    """What a member is called by: its name, its first name, its key (as members type it)."""
    return _names(persona.name, persona.short_key)


@functools.lru_cache(maxsize=1024)
def _names(full: str, key: str) -> tuple[str, ...]:
    name = " ".join(full.split())
    words = [name, key]
    parts = name.split(" ")
    if len(parts) > 1 and len(parts[0]) >= _MIN_FIRST_NAME:
        words.append(parts[0])
    return tuple(dict.fromkeys(w.strip() for w in words if w.strip()))


def keywords_of(persona: Persona) -> tuple[str, ...]:
    """What a message about a member mentions: its names, its card's tags, its lorebook's keys."""
    data = persona.card.data
    words = [*names_of(persona), *data.tags]
    book = data.character_book
    if book is not None:
        for entry in book.entries:
            if entry.enabled:
                words += entry.keys
                words += entry.secondary_keys
    return tuple(dict.fromkeys(w.strip() for w in words if len(w.strip()) >= _MIN_NAME))


def first_mention(persona: Persona, text: str) -> int | None:
    """Where `text` first names `persona`, or None."""
    pattern = _pattern(names_of(persona))
    found = pattern.search(text) if pattern is not None else None
    return found.start() if found else None


def keyword_score(persona: Persona, text: str) -> int:
    """How many of a member's different keywords `text` mentions."""
    pattern = _pattern(keywords_of(persona))
    if pattern is None:
        return 0
    return len({m.group(0).lower().lstrip("@") for m in pattern.finditer(text)})


@dataclass(frozen=True)
class Scene:
    """The personas that speak in a channel, in order, and how they take turns."""

    members: tuple[Persona, ...]
    policy: TurnPolicy = "round-robin"
    chain_limit: int = DEFAULT_CHAIN_LIMIT
    next_persona: str | None = None  # handed the next turn
    sampling: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        settings: ChannelSettings,
        personas: PersonaRegistry,
        *,
        allowed: Callable[[Persona], bool] = lambda _: True,
    ) -> Scene:
        """The scene a channel's settings describe: members the registry still has and
        `allowed` lets speak there (on Discord: the shared personas and the server's own)."""
        members = tuple(
            persona
            for key in settings.cast
            if key in personas and allowed(persona := personas.get(key))
        )
        return cls(
            members,
            policy=settings.policy,
            chain_limit=settings.chain_limit,
            next_persona=settings.next_persona,
            sampling=settings.cast_sampling,
        )

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.members)

    @property
    def names(self) -> dict[str, str]:
        """Each member's name, by key, in order: how the prompt names the other speakers."""
        return {p.key: p.name for p in self.members}

    @property
    def is_scene(self) -> bool:
        """More than one persona: turn-taking applies."""
        return len(self.members) > 1

    def member(self, key: str | None) -> Persona | None:
        return next((p for p in self.members if p.key == key), None)

    def named(self, name: str) -> Persona | None:
        """The member `name` (a key or a name, as typed) means, or None."""
        wanted = " ".join(name.split()).lower().lstrip("@")
        return next((p for p in self.members if wanted in {n.lower() for n in names_of(p)}), None)

    def sampling_for(self, persona: Persona, base: SamplingSettings) -> SamplingSettings:
        """`base` (the channel's sampling) with the member's own overrides."""
        own = self.sampling.get(persona.key)
        if not own:
            return base
        return stored_sampling(base, own)

    # -- who answers -----------------------------------------------------------------------

    def addressed(self, text: str, *, replied_to: str | None = None) -> list[Persona]:
        """The members a message addresses, each once, in the order they answer: the one it
        replies to, then those it names, by where it first names them."""
        found: list[tuple[int, int, Persona]] = []
        for index, persona in enumerate(self.members):
            if persona.key == replied_to:
                found.append((-1, index, persona))
            elif (at := first_mention(persona, text)) is not None:
                found.append((at, index, persona))
        return [persona for _, _, persona in sorted(found, key=lambda f: (f[0], f[1]))]

    def in_turn(self, last_speaker: str | None) -> list[Persona]:
        """The members in the order they come round after `last_speaker`."""
        keys = self.keys
        start = keys.index(last_speaker) + 1 if last_speaker in keys else 0
        return [*self.members[start:], *self.members[:start]]

    def pick(self, text: str, *, last_speaker: str | None) -> Persona:
        """The one member that answers a message addressed to nobody."""
        handed = self.member(self.next_persona)
        if handed is not None:
            return handed
        order = self.in_turn(last_speaker)
        if self.policy == "keywords":
            scores = [keyword_score(p, text) for p in order]
            best = max(scores)
            if best > 0:
                return order[scores.index(best)]
        return order[0]

    def handed_to(self, reply: str, speaker: str) -> Persona | None:
        """The member a reply hands the turn to: the first other member it names."""
        others = [p for p in self.members if p.key != speaker]
        return next(iter(Scene(tuple(others)).addressed(reply)), None)
