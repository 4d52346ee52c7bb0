"""Character Card V2/V3: the persona format SillyTavern and most character sites use.

A card is JSON (`{"spec": "chara_card_v2" | "chara_card_v3", "spec_version", "data": {...}}`)
or a PNG image whose `chara` (V2) or `ccv3` (V3) tEXt chunk holds that JSON in base64.
`load_card` validates it and raises `CardError` listing every problem by field, so a person who
imports a bad card learns what to fix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bot.errors import CardError

SPECS = ("chara_card_v2", "chara_card_v3")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class LoreEntry(BaseModel):
    """One `character_book` entry: `content` goes into the prompt when a key appears."""

    model_config = ConfigDict(extra="allow")

    keys: list[str] = Field(default_factory=list)
    content: str = ""
    enabled: bool = True
    insertion_order: int = 0
    case_sensitive: bool | None = None
    constant: bool | None = None
    name: str | None = None
    priority: int | None = None
    secondary_keys: list[str] = Field(default_factory=list)
    selective: bool | None = None


class CharacterBook(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    description: str | None = None
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive_scanning: bool | None = None
    entries: list[LoreEntry] = Field(default_factory=list)


class CardData(BaseModel):
    """The `data` object of a V2/V3 card. Unknown fields (V3 assets, extensions) are kept."""

    model_config = ConfigDict(extra="allow")

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = Field(default_factory=list)
    character_book: CharacterBook | None = None
    tags: list[str] = Field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class Card(BaseModel):
    model_config = ConfigDict(extra="allow")

    spec: Literal["chara_card_v2", "chara_card_v3"]
    spec_version: str
    data: CardData

    @property
    def name(self) -> str:
        return self.data.name

    def digest(self) -> str:
        """A short content hash: changes whenever the card's text changes."""
        raw = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json", exclude_none=True), ensure_ascii=False, indent=2
        )


def _field_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(card)"
        if item["type"] == "missing":
            problems.append(f"{where}: required field is missing")
        elif item["type"] == "literal_error" and item["loc"] == ("spec",):
            problems.append(f"spec: expected one of {', '.join(SPECS)}, got {item['input']!r}")
        else:
            problems.append(f"{where}: {item['msg']}")
    return problems


def parse_card(raw: bytes, source: str = "card") -> Card:
    """Parse a card from the bytes of a JSON file or a PNG image."""
    if raw.startswith(PNG_SIGNATURE):
        raw = _json_from_png(raw, source)
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CardError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    except json.JSONDecodeError as exc:
        raise CardError(
            source, [f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
        ) from None
    if not isinstance(obj, dict):
        raise CardError(source, [f"expected a JSON object, got {type(obj).__name__}"])
    if "spec" not in obj and "name" in obj and "data" not in obj:
        raise CardError(
            source,
            [
                "spec: this looks like a V1 card (no 'spec'); re-export it as Character Card V2 or V3"
            ],
        )
    try:
        return Card.model_validate(obj)
    except ValidationError as exc:
        raise CardError(source, _field_problems(exc)) from None


def _json_from_png(raw: bytes, source: str) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            chunks: dict[str, str] = dict(getattr(image, "text", {}))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise CardError(source, [f"unreadable PNG: {exc}"]) from None
    payload = chunks.get("ccv3") or chunks.get("chara")
    if payload is None:
        raise CardError(
            source, ["PNG has no 'chara' or 'ccv3' text chunk: it is not a character card"]
        )
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise CardError(source, ["PNG card chunk is not valid base64"]) from None


def load_card(path: Path) -> Card:
    """Read and validate a card file (JSON or PNG)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CardError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    return parse_card(raw, source=str(path))


def card_to_png(card: Card, image: bytes | None = None) -> bytes:
    """Embed the card in a PNG (both `chara` and, for V3, `ccv3` chunks), as card sites do."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    encoded = base64.b64encode(card.to_json().encode()).decode("ascii")
    info = PngInfo()
    info.add_text("chara", encoded)
    if card.spec == "chara_card_v3":
        info.add_text("ccv3", encoded)
    base = Image.open(io.BytesIO(image)) if image else Image.new("RGB", (64, 64), (90, 90, 140))
    out = io.BytesIO()
    base.save(out, format="PNG", pnginfo=info)
    return out.getvalue()
