"""The persona registry: character cards by key (`haruhi`, `atri`, ...), and who owns each.

Three kinds of persona, by where their card lives:

- **shipped** (`bot/personas/`): shared by every Discord server and the terminal; they speak
  through the adapter that ships for the default model until they have their own;
- **imported by the operator** (`rolecast persona import`, into `<personas>/`): shared too. A
  card with a shipped key replaces the shipped one only with `--replace`, and then it is the
  operator's persona, not the shipped one (`builtin` is false: it no longer speaks through
  the shipped adapter, which was trained on the shipped card);
- **imported in a Discord server** (`/persona import`, into `<personas>/guilds/<guild id>/`):
  owned by that server, seen and changed only there. Its registry key is `g<guild id>-<key>`,
  so the same key imported in two servers gives two personas, and everything stored under
  the key (channels, turns, approved dialogues, retrain jobs, adapter versions and served
  names, which `formats.registry` requires to be at most 64 of `[a-z0-9_-]`) stays apart.
  Shared keys may not take that shape, and a server may not import a shared key.

Discord commands find a persona with `resolve(name, guild_id)`, which sees only the shared
personas and the server's own (a server's own key wins over a shared one of the same name);
`get(key)` takes a registry key as stored, for the code that stored it. A broken card file is
reported and skipped, never fatal for the others.
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
GUILDS = "guilds"  # <personas>/guilds/<guild id>/: cards imported in a Discord server
GUILD_ID = re.compile(r"^[0-9]{1,20}$")
# The registry keys of server-owned personas; a shared key may not look like one.
GUILD_KEY = re.compile(r"^g(?P<guild>[0-9]{1,20})-(?P<key>[a-z0-9][a-z0-9_-]{0,31})$")


class PersonaExistsError(RolecastError):
    """An import under a key that is taken, without asking to replace it."""

    def __init__(self, persona: Persona, *, hint: str) -> None:
        what = "ships with Rolecast" if persona.builtin else "is imported already"
        super().__init__(f"{persona.short_key!r} {what} ({persona.name}). {hint}")
        self.persona = persona


@dataclass(frozen=True)
class Persona:
    key: str  # the registry key: what memory, retrain jobs and adapter names store
    card: Card
    path: Path
    builtin: bool  # one of the shipped cards (an operator's card under its key is not)
    guild_id: str | None = None  # the Discord server that owns it; None: shared

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def short_key(self) -> str:
        """The key people type: the registry key without its server prefix."""
        match = GUILD_KEY.match(self.key) if self.guild_id is not None else None
        return match.group("key") if match else self.key

    @property
    def shared(self) -> bool:
        return self.guild_id is None


def builtin_dir() -> Path:
    return Path(str(resources.files("bot") / "personas"))


def persona_key(text: str) -> str:
    """A registry key from a name or file stem: lower case, `[a-z0-9_-]`, at most 32 chars."""
    key = re.sub(r"[^a-z0-9_-]+", "-", text.strip().lower()).strip("-_")[:32]
    if not KEY_PATTERN.match(key):
        raise RolecastError(
            f"{text[:80]!r} cannot be used as a persona key: use letters, digits, '-' or '_' "
            "(for example: haruhi, my-knight)."
        )
    return key


def guild_key(guild_id: str, key: str) -> str:
    """The registry key of the persona `key` that the server `guild_id` owns."""
    if not GUILD_ID.match(guild_id):
        raise RolecastError(f"{guild_id[:40]!r} is not a Discord server id.")
    return f"g{guild_id}-{persona_key(key)}"


class PersonaRegistry:
    def __init__(self, user_dir: Path | None = None, *, include_builtin: bool = True) -> None:
        self.user_dir = user_dir
        self.include_builtin = include_builtin
        self._personas: dict[str, Persona] = {}
        self.problems: list[CardError] = []

    def _sources(self) -> list[tuple[Path, bool, str | None]]:
        """(folder, shipped, owning server) of every folder cards are read from."""
        sources: list[tuple[Path, bool, str | None]] = (
            [(builtin_dir(), True, None)] if self.include_builtin else []
        )
        if self.user_dir is None or not self.user_dir.is_dir():
            return sources
        sources.append((self.user_dir, False, None))
        guilds = self.user_dir / GUILDS
        try:
            owned = sorted(p for p in guilds.iterdir() if GUILD_ID.match(p.name) and p.is_dir())
        except FileNotFoundError:
            owned = []
        except OSError as exc:
            self.problems.append(CardError(str(guilds), [f"cannot list: {exc.strerror or exc}"]))
            owned = []
        sources += [(folder, False, folder.name) for folder in owned]
        return sources

    def load(self) -> PersonaRegistry:
        """(Re)read every card; problems are kept in `self.problems` and logged."""
        personas: dict[str, Persona] = {}
        self.problems = []
        for folder, builtin, guild in self._sources():
            try:
                paths = sorted(folder.iterdir())
            except OSError as exc:
                self.problems.append(
                    CardError(str(folder), [f"cannot list: {exc.strerror or exc}"])
                )
                log.warning("skipping personas directory %s: %s", folder, exc)
                continue
            for path in paths:
                if path.suffix.lower() not in CARD_SUFFIXES:
                    continue
                try:
                    key = persona_key(path.stem)
                    if guild is not None:
                        key = guild_key(guild, key)
                    elif not builtin and GUILD_KEY.match(key):
                        raise RolecastError(
                            f"the key {key!r} has the shape of a Discord server's persona "
                            "(g<server id>-<key>): rename the file"
                        )
                    personas[key] = Persona(key, load_card(path), path, builtin, guild)
                except CardError as exc:
                    self.problems.append(exc)
                except RolecastError as exc:
                    self.problems.append(CardError(str(path), [str(exc)]))
                except Exception as exc:  # one bad file must not stop the others loading
                    log.exception("unexpected error reading card %s", path)
                    self.problems.append(CardError(str(path), [f"unreadable: {exc!r}"[:300]]))
                else:
                    continue
                log.warning("skipping card: %s", self.problems[-1])
        self._personas = personas
        return self

    # -- reading --------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(self._personas)

    def all(self) -> list[Persona]:
        return [self._personas[k] for k in self.keys()]

    def shared_keys(self) -> list[str]:
        return [k for k, p in sorted(self._personas.items()) if p.shared]

    def __contains__(self, key: object) -> bool:
        return key in self._personas

    def get(self, key: str) -> Persona:
        """The persona with this registry key (as memory and jobs store it). Not for what a
        Discord member typed: that is `resolve`."""
        try:
            return self._personas[key.strip().lower()]
        except KeyError:
            # only the shared keys are named: a server's personas are its own business
            raise PersonaNotFoundError(key, self.shared_keys()) from None

    def visible(self, guild_id: str | None) -> list[Persona]:
        """What a Discord server sees: the shared personas and its own, by the key people
        type (its own first where the keys are the same). None: the shared ones only."""
        shown: dict[str, Persona] = {p.key: p for p in self._personas.values() if p.shared}
        for persona in self._personas.values():
            if guild_id is not None and persona.guild_id == guild_id:
                shown[persona.short_key] = persona
        return [shown[k] for k in sorted(shown)]

    def resolve(self, name: str, guild_id: str | None) -> Persona:
        """The persona a member of the server `guild_id` means by `name`: the server's own,
        else a shared one. Another server's persona is never found, whatever is typed."""
        wanted = name.strip().lower()
        if guild_id is not None and KEY_PATTERN.match(wanted):
            owned = self._personas.get(guild_key(guild_id, wanted))
            if owned is not None:
                return owned
        shared = self._personas.get(wanted)
        if shared is not None and shared.shared:
            return shared
        raise PersonaNotFoundError(name, [p.short_key for p in self.visible(guild_id)])

    # -- writing --------------------------------------------------------------------------

    def add(
        self, key: str, card: Card, *, guild_id: str | None = None, replace: bool = False
    ) -> Persona:
        """Write `card` as `<key>.json` (atomically) and register it: shared (the operator's
        import) or owned by the server `guild_id`. A key that is taken is replaced only with
        `replace`; a server cannot take a shared key."""
        if self.user_dir is None:
            raise RolecastError("No personas directory is configured for imported cards.")
        short = persona_key(key)
        if guild_id is None:
            if GUILD_KEY.match(short):
                raise RolecastError(
                    f"{short!r} has the shape of a Discord server's persona key "
                    "(g<server id>-<key>): choose another key."
                )
            folder, registry_key = self.user_dir, short
        else:
            shared = self._personas.get(short)
            if shared is not None and shared.shared:
                raise RolecastError(
                    f"{short!r} is a persona every server shares ({shared.name}); it cannot be "
                    "replaced from a server. Import the card under another key."
                )
            folder, registry_key = self.user_dir / GUILDS / guild_id, guild_key(guild_id, short)
        existing = self._personas.get(registry_key)
        if existing is not None and not replace:
            hint = (
                "Pass --replace to replace it."
                if guild_id is None
                else "Import it with replace: True to replace it."
            )
            raise PersonaExistsError(existing, hint=hint)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{short}.json"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{short}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(card.to_json())
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)  # a failed import leaves nothing behind
            if isinstance(exc, OSError | UnicodeError | ValueError):
                raise RolecastError(f"Could not save the card as {target.name}: {exc}") from exc
            raise
        if existing is not None and not existing.builtin and existing.path != target:
            existing.path.unlink(missing_ok=True)  # the card it replaces (a PNG, say)
        persona = Persona(registry_key, card, target, builtin=False, guild_id=guild_id)
        self._personas[registry_key] = persona
        return persona

    def remove(self, key: str) -> Persona | None:
        """Delete an imported card (by registry key). Shipped cards cannot be removed (they
        would come back). Returns the persona that answers to the key now: the shipped one an
        operator's card had replaced, or None."""
        persona = self.get(key)
        if persona.builtin:
            raise RolecastError(
                f"{persona.key!r} ships with Rolecast and cannot be removed "
                "(import a card with --replace to change it)."
            )
        try:
            persona.path.unlink(missing_ok=True)
        except OSError as exc:
            raise RolecastError(f"Could not delete {persona.path}: {exc}") from exc
        self.load()
        return self._personas.get(persona.key)
