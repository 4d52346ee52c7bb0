"""The adapter registry: versioned adapter directories and a current-version pointer per persona.

Layout (a directory the model servers, the publisher and the bot all see, e.g. a shared volume;
its root is `formats.paths.RolecastPaths.adapters`)::

    <root>/<persona>/v1/          adapter_config.json, adapter_model.safetensors, rolecast.json
    <root>/<persona>/v2/
    <root>/<persona>/current.json {"version": 2, "served_name": "haruhi@v2", "history": [1, 2]}

Version directories never change once written, so a served name `<persona>@v<N>` always means
the same weights and is never reused for others. `current.json` is replaced atomically, so a
reader sees the old pointer or the new one, never half of either; it is the file other processes
(the bot) read to learn which served name a persona speaks through. A persona whose versions are
all rolled back has no `current.json`: it speaks through the base model.

One implementation for every side: `serving` publishes and rolls back through `AdapterRegistry`,
the vLLM launcher and the embedded server load its current versions, and the bot reads the
pointer (`current_served_name`) to pick the model of each reply.

One persona's broken files never hide the others: reading a persona raises `RegistryError`
(never another exception) for a pointer that is not JSON, of the wrong shape, names another
served name than its version's, or points at a version that is missing, and the readers of the
whole registry (servers, `rolecast adapters list`) skip that persona with the reason logged.
A publish repairs such a persona: it numbers the new version after every one it finds and
writes a fresh pointer.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from formats import lora
from formats.errors import FormatError, RegistryError
from formats.jsonfile import read_object, write_atomic
from formats.manifest import Manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)

PERSONA_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
SERVED_NAME_RE = re.compile(r"^(?P<persona>.+)@v(?P<version>[1-9][0-9]*)$")
POINTER = "current.json"
#: What a version does not take from the directory it is copied from: tokenizer files (the
#: tokenizer is the base model's, `formats.lora.TOKENIZER_FILES`) and training checkpoints (the
#: trainer's resume state, never served).
NOT_COPIED = (*sorted(lora.TOKENIZER_FILES), "checkpoints")


def served_name(persona: str, version: int) -> str:
    return f"{persona}@v{version}"


def parse_served_name(name: str) -> tuple[str, int] | None:
    """(persona, version) of a served adapter name `<persona>@v<N>`, None for other names."""
    match = SERVED_NAME_RE.match(name)
    return (match.group("persona"), int(match.group("version"))) if match else None


class Pointer(BaseModel):
    """`<persona>/current.json`: the live version and the publish history behind it."""

    model_config = ConfigDict(extra="allow")

    version: int = Field(ge=1)
    served_name: str
    history: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    switched: str | None = None


@dataclass(frozen=True)
class AdapterVersion:
    persona: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def served_name(self) -> str:
        return served_name(self.persona, self.version)

    @property
    def rank(self) -> int:
        try:
            return lora.rank(lora.read_config(self.path))
        except FormatError as exc:
            raise RegistryError(str(exc)) from None


class AdapterRegistry:
    """Versions and current pointers under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _persona_dir(self, persona: str) -> Path:
        if not PERSONA_RE.match(persona):
            raise RegistryError(
                f"persona name {persona[:80]!r} must be 1-64 lower-case letters, digits, '-' "
                "or '_', starting with a letter or digit"
            )
        return self.root / persona

    def check_writable(self, persona: str) -> None:
        """RegistryError unless `persona` is a valid name (`PERSONA_RE`) whose pointer can be
        written (a publish checks this before it adds a version)."""
        path = self._persona_dir(persona) / POINTER
        if path.exists() and not path.is_file():
            raise RegistryError(f"{path} is not a file: remove it, then publish again")

    # -- reading ----------------------------------------------------------------------------

    def personas(self) -> list[str]:
        try:
            return sorted(
                p.name for p in self.root.iterdir() if PERSONA_RE.match(p.name) and p.is_dir()
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("cannot list the adapter registry %s: %s", self.root, exc)
            return []

    def _children(self, folder: Path) -> list[Path]:
        try:
            return list(folder.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RegistryError(f"cannot list {folder}: {exc.strerror or exc}") from None

    def versions(self, persona: str) -> list[AdapterVersion]:
        base = self._persona_dir(persona)
        found = []
        for child in self._children(base):
            match = VERSION_RE.match(child.name)
            if match and child.is_dir():
                try:
                    manifest = read_manifest(child)
                except FormatError as exc:
                    log.warning("%s; listed without its manifest", exc)
                    manifest = Manifest()
                found.append(AdapterVersion(persona, int(match.group(1)), child, manifest))
        return sorted(found, key=lambda v: v.version)

    def pointer(self, persona: str) -> Pointer | None:
        """The persona's `current.json`, None when it speaks through the base model."""
        path = self._persona_dir(persona) / POINTER
        try:
            data = read_object(path)
            pointer = None if data is None else Pointer.model_validate(data)
        except (ValueError, UnicodeDecodeError, ValidationError) as exc:
            reason = str(exc).replace("\n", " ")[:300]
            raise RegistryError(f"{path} is not a valid pointer: {reason}") from None
        if pointer is not None and pointer.served_name != served_name(persona, pointer.version):
            raise RegistryError(
                f"{path} is not a valid pointer: it names {pointer.served_name[:80]!r} for "
                f"version {pointer.version} of {persona}"
            )
        return pointer

    def current(self, persona: str) -> AdapterVersion | None:
        pointer = self.pointer(persona)
        if pointer is None:
            return None
        for v in self.versions(persona):
            if v.version == pointer.version:
                return v
        raise RegistryError(f"{persona}'s {POINTER} points at v{pointer.version}, which is missing")

    def current_versions(self) -> list[AdapterVersion]:
        return [v for p in self.personas() if (v := self.current(p)) is not None]

    def current_served_name(self, persona: str) -> str | None:
        """The served name the registry points the persona at (`haruhi@v2`), or None (the base
        model, an unknown persona, or a pointer that cannot be read, which is logged)."""
        try:
            pointer = self.pointer(persona)
        except RegistryError as exc:
            log.warning("%s", exc)
            return None
        return pointer.served_name if pointer is not None else None

    def knows(self, persona: str) -> bool:
        """Whether the persona was ever published here (it has a version directory)."""
        if not PERSONA_RE.match(persona):
            return False
        try:
            children = self._children(self.root / persona)
        except RegistryError as exc:
            log.warning("%s", exc)
            return False
        return any(VERSION_RE.match(p.name) and p.is_dir() for p in children)

    def readable_pointer(self, persona: str) -> Pointer | None:
        """The pointer, or None with a warning when it cannot be read (a publish or a rollback
        then writes a fresh one)."""
        try:
            return self.pointer(persona)
        except RegistryError as exc:
            log.warning("%s; it will be replaced", exc)
            return None

    def previous(self, persona: str) -> AdapterVersion | None:
        """The version a rollback returns to; None: the base model (the first version is live)."""
        pointer = self.pointer(persona)
        if pointer is None:
            raise RegistryError(f"{persona} has no published adapter")
        if len(pointer.history) < 2:
            return None
        wanted = pointer.history[-2]
        for v in self.versions(persona):
            if v.version == wanted:
                return v
        raise RegistryError(f"{persona}'s previous version v{wanted} is missing from the registry")

    # -- writing ----------------------------------------------------------------------------

    def add_version(self, persona: str, source: Path) -> AdapterVersion:
        """Copy an adapter directory in as the persona's next version (never an old number),
        without tokenizer files or training checkpoints (`NOT_COPIED`)."""
        base = self._persona_dir(persona)
        base.mkdir(parents=True, exist_ok=True)
        pointer = self.readable_pointer(persona)
        used = [v.version for v in self.versions(persona)] + (pointer.history if pointer else [])
        used += [pointer.version] if pointer else []
        version = max(used, default=0) + 1
        target = base / f"v{version}"
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=base))
        try:
            shutil.copytree(
                source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED)
            )
            manifest = read_manifest(tmp)
            config = lora.read_config(tmp)
            named = config.get("base_model_name_or_path")
            if manifest.base_model is None and isinstance(named, str):
                manifest.base_model = named
            if manifest.rank is None:
                manifest.rank = lora.rank(config)
            if manifest.created is None:
                manifest.created = datetime.now(UTC).isoformat(timespec="seconds")
            manifest.persona = persona
            manifest.version = version
            manifest.served_name = served_name(persona, version)
            write_manifest(tmp, manifest)
            tmp.chmod(0o755)
            tmp.rename(target)
        except FormatError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(f"cannot add {source}: {exc}") from None
        except (OSError, shutil.Error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RegistryError(f"cannot copy {source} into the registry: {exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("added %s as %s", source, target)
        return AdapterVersion(persona, version, target, manifest)

    def set_current(self, persona: str, version: int, *, rollback: bool = False) -> None:
        """Point the persona at `version`, atomically. A publish appends to the history; a
        rollback drops the newest entry."""
        pointer = self.readable_pointer(persona)
        history = list(pointer.history) if pointer is not None else []
        if rollback:
            history = history[:-1]
        else:
            history.append(version)
        new = Pointer(
            version=version,
            served_name=served_name(persona, version),
            history=history,
            switched=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        path = self._persona_dir(persona) / POINTER
        try:
            write_atomic(path, new.model_dump(mode="json"))
        except OSError as exc:
            raise RegistryError(f"cannot write {path}: {exc.strerror or exc}") from None

    def clear_current(self, persona: str) -> None:
        """Return the persona to the base model: remove its pointer (its versions stay, and
        their numbers are never used again)."""
        (self._persona_dir(persona) / POINTER).unlink(missing_ok=True)
