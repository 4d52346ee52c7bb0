"""The persona registry: character cards by key (`haruhi`, `atri`, ...).

Cards come from the ones shipped with the project (`bot/personas/`) and from a user directory
where imported cards are written; a user card with the same key replaces the shipped one. A
broken card file is reported and skipped, never fatal for the others.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bot.core.cards import Card, load_card
from bot.errors import CardError, PersonaNotFoundError, RolecastError

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
CARD_SUFFIXES = (".json", ".png")


@dataclass(frozen=True)
class Persona:
    key: str
    card: Card
    path: Path
    builtin: bool

    @property
    def name(self) -> str:
        return self.card.name


def builtin_dir() -> Path:
    return Path(str(resources.files("bot") / "personas"))


def persona_key(text: str) -> str:
    """A registry key from a name or file stem: lower case, `[a-z0-9_-]`, at most 32 chars."""
    key = re.sub(r"[^a-z0-9_-]+", "-", text.strip().lower()).strip("-_")[:32]
    if not KEY_PATTERN.match(key):
        raise RolecastError(
            f"{text!r} cannot be used as a persona key: use letters, digits, '-' or '_' "
            "(for example: haruhi, my-knight)."
        )
    return key


class PersonaRegistry:
    def __init__(self, user_dir: Path | None = None, *, include_builtin: bool = True) -> None:
        self.user_dir = user_dir
        self.include_builtin = include_builtin
        self._personas: dict[str, Persona] = {}
        self.problems: list[CardError] = []

    def load(self) -> PersonaRegistry:
        """(Re)read every card; problems are kept in `self.problems` and logged."""
        personas: dict[str, Persona] = {}
        problems: list[CardError] = []
        sources = [(builtin_dir(), True)] if self.include_builtin else []
        if self.user_dir is not None and self.user_dir.is_dir():
            sources.append((self.user_dir, False))
        for folder, builtin in sources:
            try:
                paths = sorted(folder.iterdir())
            except OSError as exc:
                problems.append(CardError(str(folder), [f"cannot list: {exc.strerror or exc}"]))
                log.warning("skipping personas directory %s: %s", folder, exc)
                continue
            for path in paths:
                if path.suffix.lower() not in CARD_SUFFIXES:
                    continue
                try:
                    key = persona_key(path.stem)
                    personas[key] = Persona(key, load_card(path), path, builtin)
                except CardError as exc:
                    problems.append(exc)
                except RolecastError as exc:
                    problems.append(CardError(str(path), [str(exc)]))
                except Exception as exc:  # one bad file must not stop the others loading
                    log.exception("unexpected error reading card %s", path)
                    problems.append(CardError(str(path), [f"unreadable: {exc!r}"[:300]]))
                else:
                    continue
                log.warning("skipping card: %s", problems[-1])
        self._personas = personas
        self.problems = problems
        return self

    def keys(self) -> list[str]:
        return sorted(self._personas)

    def all(self) -> list[Persona]:
        return [self._personas[k] for k in self.keys()]

    def __contains__(self, key: object) -> bool:
        return key in self._personas

    def get(self, key: str) -> Persona:
        try:
            return self._personas[key.strip().lower()]
        except KeyError:
            raise PersonaNotFoundError(key, self.keys()) from None

    def add(self, key: str, card: Card) -> Persona:
        """Write `card` to the user directory as `<key>.json` (atomically) and register it."""
        if self.user_dir is None:
            raise RolecastError("No personas directory is configured for imported cards.")
        key = persona_key(key)
        self.user_dir.mkdir(parents=True, exist_ok=True)
        target = self.user_dir / f"{key}.json"
        fd, tmp = tempfile.mkstemp(dir=self.user_dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(card.to_json())
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)  # a failed import leaves nothing behind
            if isinstance(exc, OSError | UnicodeError | ValueError):
                raise RolecastError(f"Could not save the card as {target.name}: {exc}") from exc
            raise
        persona = Persona(key, card, target, builtin=False)
        self._personas[key] = persona
        return persona

    def remove(self, key: str) -> None:
        """Delete an imported card. Shipped cards cannot be removed (they would come back)."""
        persona = self.get(key)
        if persona.builtin:
            raise RolecastError(f"{persona.key!r} ships with Rolecast and cannot be removed.")
        persona.path.unlink(missing_ok=True)
        self.load()
