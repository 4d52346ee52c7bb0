"""The adapter registry: versioned adapter directories and a current-version pointer per persona.

Layout (a directory the model server and the publisher both see, e.g. a shared volume)::

    <root>/<persona>/v1/          adapter_config.json, adapter_model.safetensors, rolecast.json
    <root>/<persona>/v2/
    <root>/<persona>/current.json {"version": 2, "served_name": "haruhi@v2", "history": [1, 2]}

Version directories never change once written, so a served name `<persona>@v<N>` always means
the same weights and is never reused for others. `current.json` is replaced atomically
(`os.replace`), so a reader sees the old pointer or the new one, never half of either; it is the
file other processes (the bot) read to learn which served name a persona speaks through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PERSONA_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(Exception):
    """A publish, rollback or lookup that cannot be done; the message says why."""


def served_name(persona: str, version: int) -> str:
    return f"{persona}@v{version}"


@dataclass(frozen=True)
class AdapterVersion:
    persona: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def served_name(self) -> str:
        return served_name(self.persona, self.version)

    @property
    def rank(self) -> int:
        return adapter_rank(read_adapter_config(self.path))


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RegistryError(f"{adapter_dir} is not a PEFT adapter: no adapter_config.json") from exc
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise RegistryError(f"{path} does not hold a JSON object")
    return config


def adapter_rank(config: dict[str, Any]) -> int:
    ranks = [
        int(config.get("r", 0)),
        *(int(v) for v in (config.get("rank_pattern") or {}).values()),
    ]
    return max(ranks)


def _base_key(name: str | None) -> str:
    """Compare base models by their last path component: a hub id and a local copy of it
    (`HuggingFaceTB/SmolLM2-135M-Instruct`, `/models/SmolLM2-135M-Instruct`) are the same."""
    return (name or "").rstrip("/").rsplit("/", 1)[-1].lower()


def validate_adapter(adapter_dir: Path, *, base_model: str | None, max_rank: int) -> list[str]:
    """Every reason the adapter cannot be published (empty: it can). Checks what vLLM needs:
    the same base model, peft_type LORA, rank within the server's limit, no modules_to_save,
    no DoRA, and the weights file present."""
    config = read_adapter_config(adapter_dir)
    problems = []
    peft_type = str(config.get("peft_type", ""))
    if peft_type.upper() != "LORA":
        problems.append(f"peft_type is {peft_type or 'missing'}; only LORA adapters can be served")
    rank = adapter_rank(config)
    if rank > max_rank:
        problems.append(f"rank {rank} exceeds the server's max LoRA rank {max_rank}")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save is set ({config['modules_to_save']}); vLLM cannot serve full "
            "copies of modules, train without modules_to_save"
        )
    if config.get("use_dora"):
        problems.append("use_dora is true; vLLM does not serve DoRA adapters")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        problems.append("adapter_model.safetensors is missing")
    if base_model is not None:
        manifest = read_manifest(adapter_dir)
        adapter_base = manifest.get("base_model") or config.get("base_model_name_or_path")
        if _base_key(adapter_base) != _base_key(base_model):
            problems.append(
                f"base model differs: the adapter was trained on {adapter_base!r}, "
                f"the server runs {base_model!r}"
            )
    return problems


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "rolecast.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AdapterRegistry:
    """Versions and current pointers under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _persona_dir(self, persona: str) -> Path:
        if not PERSONA_RE.match(persona):
            raise RegistryError(
                f"persona name {persona!r} must be lower-case letters, digits, '-' or '_'"
            )
        return self.root / persona

    def personas(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and PERSONA_RE.match(p.name)
        )

    def versions(self, persona: str) -> list[AdapterVersion]:
        base = self._persona_dir(persona)
        found = []
        if base.is_dir():
            for child in base.iterdir():
                match = VERSION_RE.match(child.name)
                if match and child.is_dir():
                    found.append(
                        AdapterVersion(persona, int(match.group(1)), child, read_manifest(child))
                    )
        return sorted(found, key=lambda v: v.version)

    def pointer(self, persona: str) -> dict[str, Any] | None:
        path = self._persona_dir(persona) / "current.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None

    def current(self, persona: str) -> AdapterVersion | None:
        pointer = self.pointer(persona)
        if not pointer:
            return None
        version = int(pointer["version"])
        for v in self.versions(persona):
            if v.version == version:
                return v
        raise RegistryError(f"{persona}'s current.json points at v{version}, which is missing")

    def current_versions(self) -> list[AdapterVersion]:
        return [v for p in self.personas() if (v := self.current(p)) is not None]

    def add_version(self, persona: str, source: Path) -> AdapterVersion:
        """Copy an adapter directory in as the persona's next version (never an old number)."""
        base = self._persona_dir(persona)
        base.mkdir(parents=True, exist_ok=True)
        pointer = self.pointer(persona) or {}
        used = [v.version for v in self.versions(persona)] + list(pointer.get("history", []))
        version = max(used, default=0) + 1
        target = base / f"v{version}"
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=base))
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            manifest = read_manifest(tmp)
            config = read_adapter_config(tmp)
            manifest.setdefault("base_model", config.get("base_model_name_or_path"))
            manifest.setdefault("rank", adapter_rank(config))
            manifest.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
            manifest["persona"] = persona
            manifest["version"] = version
            manifest["served_name"] = served_name(persona, version)
            _write_json_atomic(tmp / "rolecast.json", manifest)
            tmp.chmod(0o755)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("added %s as %s", source, target)
        return AdapterVersion(persona, version, target, manifest)

    def set_current(self, persona: str, version: int, *, rollback: bool = False) -> None:
        """Point the persona at `version`, atomically. A publish appends to the history; a
        rollback drops the newest entry."""
        pointer = self.pointer(persona) or {"history": []}
        history = [int(v) for v in pointer.get("history", [])]
        if rollback:
            history = history[:-1]
        else:
            history.append(version)
        _write_json_atomic(
            self._persona_dir(persona) / "current.json",
            {
                "version": version,
                "served_name": served_name(persona, version),
                "history": history,
                "switched": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )

    def previous(self, persona: str) -> AdapterVersion:
        """The version a rollback returns to."""
        pointer = self.pointer(persona)
        history = [int(v) for v in (pointer or {}).get("history", [])]
        if len(history) < 2:
            raise RegistryError(f"{persona} has no earlier published version to roll back to")
        wanted = history[-2]
        for v in self.versions(persona):
            if v.version == wanted:
                return v
        raise RegistryError(f"{persona}'s previous version v{wanted} is missing from the registry")
