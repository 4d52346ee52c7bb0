"""An adapter's manifest, `rolecast.json`: what it was trained on, how, and what it scored.

Four writers fill it, each its own part, and all go through `write_manifest`:

- `rolecast train` (`finetune`): persona, base model, system prompt, data, settings, metrics,
  times, device, created;
- `rolecast soup` (`finetune`): the same, plus `soup` (its sources);
- the registry (`formats.registry`, on publish): persona, version, served name, rank, and the
  base model / created when the adapter did not say;
- the retrain gate (`bot.retrain`): the gate's scores in `metrics` and `eval`, and `retrain_job`.

Its readers (the registry, `rolecast eval|compare|soup`, the bot's `/adapters`) read it with
`read_manifest`. The schema is versioned (`schema_version`); files written before it had a
version still read (they simply lack the key), and keys this version does not know are kept as
they are, so an older reader never drops what a newer writer added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from formats.errors import ManifestError
from formats.jsonfile import read_object, write_atomic

MANIFEST = "rolecast.json"
SCHEMA_VERSION = 1


class DataInfo(BaseModel):
    """The training data: file, content hash and sizes."""

    model_config = ConfigDict(extra="allow")

    path: str | None = None
    sha256: str | None = None
    dialogues: int | None = None
    tokens: int | None = None
    assistant_tokens: int | None = None


class EvalInfo(BaseModel):
    """The retrain gate's verdict: the new adapter's scores and what they were compared with."""

    model_config = ConfigDict(extra="allow")

    against: str
    scores: dict[str, float]


class SoupInfo(BaseModel):
    """An averaged adapter's sources."""

    model_config = ConfigDict(extra="allow")

    sources: list[str]
    seeds: list[int | None] = Field(default_factory=list)
    rank: int
    retained_energy: float


class Manifest(BaseModel):
    """`rolecast.json`. Every field is optional: each writer fills its own part."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    # what was trained (rolecast train, rolecast soup)
    persona: str | None = None
    # an adapter that plays several personas (the one that ships for the default model)
    personas: list[str] | None = None
    base_model: str | None = None
    system_prompt: str | None = None
    data: DataInfo | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    wall_time_s: float | None = None
    train_time_s: float | None = None
    tokens_per_s: float | None = None
    device: str | None = None
    created: str | None = None
    soup: SoupInfo | None = None
    # where it is served (the registry)
    version: int | None = None
    served_name: str | None = None
    rank: int | None = None
    # how it passed the retrain gate (bot.retrain)
    eval: EvalInfo | None = None
    retrain_job: int | None = None

    @property
    def versioned(self) -> bool:
        """False for a file written before the schema carried a version."""
        return "schema_version" in self.model_fields_set

    def to_json(self) -> dict[str, Any]:
        """The JSON object to write: every key that was read or set, unknown ones included (also
        inside `data`, `eval`, `soup`), defaults left out, and the current schema version."""
        full = self.model_dump(mode="json")
        kept = self.model_dump(mode="json", exclude_unset=True)
        for name, info in type(self).model_fields.items():
            # a default changed in place (`manifest.metrics["x"] = 1`) is not "set", but written
            if name not in kept and full[name] != info.get_default(call_default_factory=True):
                kept[name] = full[name]
        kept["schema_version"] = SCHEMA_VERSION
        return {name: kept[name] for name in full if name in kept}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "rolecast.json") -> Manifest:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()
            )
            raise ManifestError(f"{source} is not a valid adapter manifest: {problems}") from None


def manifest_path(adapter_dir: Path) -> Path:
    return Path(adapter_dir) / MANIFEST


def read_manifest(adapter_dir: Path) -> Manifest:
    """The adapter's manifest; an empty one when the adapter has none."""
    path = manifest_path(adapter_dir)
    try:
        data = read_object(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest() if data is None else Manifest.from_json(data, str(path))


def write_manifest(adapter_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Replace the adapter's `rolecast.json` atomically; returns what was written."""
    data = manifest.to_json()
    write_atomic(manifest_path(adapter_dir), data)
    return data
