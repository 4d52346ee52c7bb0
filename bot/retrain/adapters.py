"""A read-only view of the adapter registry the model server and the publisher share.

The registry's files are the seam (`<root>/<persona>/v<N>/rolecast.json` and the atomically
replaced `<root>/<persona>/current.json`); the bot reads them and never writes them: changes go
through `rolecast adapters publish|rollback`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_VERSION = re.compile(r"^v([1-9][0-9]*)$")


@dataclass(frozen=True)
class Version:
    persona: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def served_name(self) -> str:
        return f"{self.persona}@v{self.version}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def pointer(root: Path, persona: str) -> dict[str, Any] | None:
    """The persona's `current.json`, or None when it has no published version."""
    if "/" in persona or persona.startswith("."):
        return None
    return _read_json(Path(root) / persona / "current.json")


def current_served_name(root: Path, persona: str) -> str | None:
    """The served name the registry points the persona at (`haruhi@v2`), or None."""
    data = pointer(root, persona)
    if not data or "version" not in data:
        return None
    return str(data.get("served_name") or f"{persona}@v{int(data['version'])}")


def versions(root: Path, persona: str) -> list[Version]:
    base = Path(root) / persona
    found = []
    if base.is_dir():
        for child in base.iterdir():
            match = _VERSION.match(child.name)
            if match and child.is_dir():
                manifest = _read_json(child / "rolecast.json") or {}
                found.append(Version(persona, int(match.group(1)), child, manifest))
    return sorted(found, key=lambda v: v.version)


def current(root: Path, persona: str) -> Version | None:
    data = pointer(root, persona)
    if not data or "version" not in data:
        return None
    wanted = int(data["version"])
    return next((v for v in versions(root, persona) if v.version == wanted), None)
