"""Character Card V2/V3: the persona format SillyTavern and most character sites use.

A card is JSON (`{"spec": "chara_card_v2" | "chara_card_v3", "spec_version", "data": {...}}`)
or a PNG image whose `chara` (V2) or `ccv3` (V3) text chunk holds that JSON in base64.
`load_card` validates it and raises `CardError` listing every problem by field, so a person who
imports a bad card learns what to fix.

A card comes from anyone, so every size is checked before the part that it bounds is read: the
file size; in a PNG, the number and size of chunks, the image's pixel count (the image itself
is never decoded) and the inflated size of a compressed text chunk (inflated in bounded steps);
in the JSON, the nesting depth (before parsing), the length of every number (while parsing),
then the length of every string and list and the number of values. Lone UTF-16 surrogates
(from escapes such as "\\ud800") are replaced, so a card's text can always be stored, hashed
and sent. Each rejection says what was too large or malformed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bot.core.text import clean_text
from bot.errors import CardError

SPECS = ("chara_card_v2", "chara_card_v3")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MAX_CARD_BYTES = 8 * 1024 * 1024  # a card file, JSON or PNG
MAX_TEXT_CHUNK_BYTES = 8 * 1024 * 1024  # a PNG text chunk once inflated
MAX_PNG_CHUNKS = 4096
MAX_IMAGE_PIXELS = 40_000_000
MAX_JSON_DEPTH = 64
MAX_NUMBER_CHARS = 40
MAX_INT = 2**63  # integers must fit in 64 bits
MAX_STRING_CHARS = 200_000
MAX_LIST_ITEMS = 10_000
MAX_OBJECT_KEYS = 10_000
MAX_JSON_VALUES = 200_000
MAX_NAME_CHARS = 256
MAX_LORE_ENTRIES = 1000
MAX_LORE_KEYS = 64
MAX_LORE_KEY_CHARS = 200


class LoreEntry(BaseModel):
    """One `character_book` entry: `content` goes into the prompt when a key appears."""

    model_config = ConfigDict(extra="allow")

    keys: list[Annotated[str, Field(max_length=MAX_LORE_KEY_CHARS)]] = Field(
        default_factory=list, max_length=MAX_LORE_KEYS
    )
    content: str = ""
    enabled: bool = True
    insertion_order: int = 0
    case_sensitive: bool | None = None
    constant: bool | None = None
    name: str | None = None
    priority: int | None = None
    secondary_keys: list[Annotated[str, Field(max_length=MAX_LORE_KEY_CHARS)]] = Field(
        default_factory=list, max_length=MAX_LORE_KEYS
    )
    selective: bool | None = None


class CharacterBook(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    description: str | None = None
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive_scanning: bool | None = None
    entries: list[LoreEntry] = Field(default_factory=list, max_length=MAX_LORE_ENTRIES)


class Asset(BaseModel):
    """A V3 card asset (`{"type": "icon", "uri": "https://...", "name", "ext"}`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    uri: str
    name: str = ""
    ext: str = ""


class CardData(BaseModel):
    """The `data` object of a V2/V3 card. Unknown fields (V3 extras, extensions) are kept."""

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
    assets: list[Asset] | None = None  # V3

    @field_validator("name")
    @classmethod
    def _name_fits(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if len(value) > MAX_NAME_CHARS:
            raise ValueError(f"{len(value)} characters, more than the {MAX_NAME_CHARS} allowed")
        return value


class Card(BaseModel):
    model_config = ConfigDict(extra="allow")

    spec: Literal["chara_card_v2", "chara_card_v3"]
    spec_version: str
    data: CardData

    @model_validator(mode="before")
    @classmethod
    def _clean_strings(cls, value: Any) -> Any:
        # However the card was made, its text can be encoded (stored, hashed, sent).
        return _clean_strings(value) if isinstance(value, dict) else value

    @property
    def name(self) -> str:
        return self.data.name

    def digest(self) -> str:
        """A short content hash: changes whenever the card's text changes."""
        raw = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(raw.encode("ascii")).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json", exclude_none=True), ensure_ascii=False, indent=2
        )


def _clean_strings(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_strings(v) for v in value]
    if isinstance(value, dict):
        return {_clean_strings(k): _clean_strings(v) for k, v in value.items()}
    return value


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _field_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(card)"
        if item["type"] == "missing":
            problems.append(f"{where}: required field is missing")
        elif item["type"] == "literal_error" and item["loc"] == ("spec",):
            problems.append(
                f"spec: expected one of {', '.join(SPECS)}, got {_short_repr(item['input'])}"
            )
        else:
            problems.append(f"{where}: {item['msg']}")
    return problems


class _Reject(Exception):
    """One reason a card is refused before it is validated."""


def parse_card(raw: bytes, source: str = "card") -> Card:
    """Parse a card from the bytes of a JSON file or a PNG image."""
    try:
        if len(raw) > MAX_CARD_BYTES:
            raise _Reject(
                f"the file is {len(raw) // 1024} KiB; cards must be at most "
                f"{MAX_CARD_BYTES // 1024 // 1024} MiB"
            )
        if raw.startswith(PNG_SIGNATURE):
            raw = _json_from_png(raw)
        obj = _load_json(raw)
    except _Reject as exc:
        raise CardError(source, [str(exc)]) from None
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


# -- JSON ----------------------------------------------------------------------------------

# A JSON string (skipped whole) or a bracket: enough to measure nesting without parsing.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _check_depth(text: str) -> None:
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise _Reject(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        elif char in "]}":
            depth -= 1


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _Reject(f"a number of {len(literal)} digits; numbers must fit in 64 bits")
    value = int(literal)
    if not -MAX_INT <= value < MAX_INT:
        raise _Reject(f"the number {literal} does not fit in 64 bits")
    return value


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _Reject(
            f"a number written with {len(literal)} characters (at most {MAX_NUMBER_CHARS})"
        )
    value = float(literal)
    if not math.isfinite(value):
        raise _Reject(f"the number {literal} is out of range")
    return value


def _parse_constant(literal: str) -> Any:
    raise _Reject(f"{literal} is not a JSON value")


def _load_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Reject(f"not UTF-8 text (byte {exc.start})") from None
    _check_depth(text)
    try:
        obj = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as exc:
        raise _Reject(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # a limit of the parser itself
        raise _Reject(f"not usable JSON: {exc}") from None
    return _Limits().walk(obj, ())


class _Limits:
    """Checks string, list and object sizes and the number of values; cleans text."""

    def __init__(self) -> None:
        self.values = 0

    def walk(self, value: Any, path: tuple[str | int, ...]) -> Any:
        self.values += 1
        if self.values > MAX_JSON_VALUES:
            raise _Reject(f"more than {MAX_JSON_VALUES:,} JSON values")
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise _Reject(
                    f"{_where(path)}: {len(value):,} characters, more than the "
                    f"{MAX_STRING_CHARS:,} allowed"
                )
            return clean_text(value)
        if isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                raise _Reject(
                    f"{_where(path)}: a list of {len(value):,} items, more than the "
                    f"{MAX_LIST_ITEMS:,} allowed"
                )
            return [self.walk(item, (*path, i)) for i, item in enumerate(value)]
        if isinstance(value, dict):
            if len(value) > MAX_OBJECT_KEYS:
                raise _Reject(
                    f"{_where(path)}: an object with {len(value):,} keys, more than the "
                    f"{MAX_OBJECT_KEYS:,} allowed"
                )
            out = {}
            for key, item in value.items():
                if len(key) > MAX_STRING_CHARS:
                    raise _Reject(f"{_where(path)}: a key of {len(key):,} characters")
                name = clean_text(key)
                out[name] = self.walk(item, (*path, name))
            return out
        return value


def _where(path: tuple[str | int, ...]) -> str:
    where = ".".join(str(part) for part in path) or "(card)"
    return where if len(where) <= 80 else where[:79] + "…"


# -- PNG -----------------------------------------------------------------------------------

_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_CARD_KEYWORDS = (b"ccv3", b"chara")  # the V3 chunk wins when both are present


def _json_from_png(raw: bytes) -> bytes:
    """The card JSON from a PNG's `ccv3` or `chara` text chunk, reading chunks directly."""
    found: dict[bytes, bytes] = {}
    pos = len(PNG_SIGNATURE)
    for number in range(1, MAX_PNG_CHUNKS + 2):
        if number > MAX_PNG_CHUNKS:
            raise _Reject(f"unreadable PNG: more than {MAX_PNG_CHUNKS} chunks")
        if pos + 12 > len(raw):
            if found:
                break  # a truncated tail after the card chunk: the card is whole
            if pos == len(raw):
                raise _Reject(
                    "PNG has no 'chara' or 'ccv3' text chunk (and no IEND): it is not a "
                    "character card"
                )
            raise _Reject("unreadable PNG: the file ends in the middle of a chunk")
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        end = pos + 12 + length
        if not kind.isalpha() or not kind.isascii():
            raise _Reject(f"unreadable PNG: chunk {number} is corrupt")
        if length > 2**31 - 1 or end > len(raw):
            if found:
                break
            raise _Reject(f"unreadable PNG: chunk {number} ({kind.decode()}) runs past the file")
        data = raw[pos + 8 : pos + 8 + length]
        if number == 1:
            _check_header(kind, data)
        if kind in _TEXT_CHUNKS:
            crc = int.from_bytes(raw[end - 4 : end], "big")
            if zlib.crc32(kind + data) != crc:
                raise _Reject(f"unreadable PNG: chunk {number} ({kind.decode()}) is corrupt")
            keyword, _, rest = data.partition(b"\x00")
            if keyword in _CARD_KEYWORDS and keyword not in found:
                found[keyword] = _chunk_text(kind, rest)
        if kind == b"IEND":
            break
        pos = end
    payload = found.get(b"ccv3") or found.get(b"chara")
    if payload is None:
        raise _Reject("PNG has no 'chara' or 'ccv3' text chunk: it is not a character card")
    try:
        return base64.b64decode(b"".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _Reject("PNG card chunk is not valid base64") from None


def _check_header(kind: bytes, data: bytes) -> None:
    if kind != b"IHDR" or len(data) != 13:
        raise _Reject("unreadable PNG: it does not start with an image header")
    width = int.from_bytes(data[0:4], "big")
    height = int.from_bytes(data[4:8], "big")
    if width * height > MAX_IMAGE_PIXELS:
        raise _Reject(
            f"the image is {width}×{height} pixels, more than the "
            f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels allowed (a decompression bomb?)"
        )


def _chunk_text(kind: bytes, rest: bytes) -> bytes:
    """The text of a text chunk after its keyword, inflated if it is compressed."""
    if kind == b"tEXt":
        return rest
    if kind == b"zTXt":
        if rest[:1] != b"\x00":
            raise _Reject("unreadable PNG: a compressed text chunk uses an unknown method")
        return _inflate(rest[1:])
    # iTXt: compression flag, method, language tag \0, translated keyword \0, text
    flag, method, rest = rest[:1], rest[1:2], rest[2:]
    _, _, rest = rest.partition(b"\x00")
    _, _, text = rest.partition(b"\x00")
    if flag == b"\x01":
        if method != b"\x00":
            raise _Reject("unreadable PNG: a compressed text chunk uses an unknown method")
        return _inflate(text)
    return text


def _inflate(data: bytes) -> bytes:
    """Inflate a compressed text chunk, never to more than MAX_TEXT_CHUNK_BYTES."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES + 1)
    except zlib.error:
        raise _Reject("unreadable PNG: a compressed text chunk is corrupt") from None
    if len(out) > MAX_TEXT_CHUNK_BYTES or inflater.unconsumed_tail:
        raise _Reject(
            "a compressed text chunk inflates to more than "
            f"{MAX_TEXT_CHUNK_BYTES // 1024 // 1024} MiB"
        )
    if not inflater.eof:
        raise _Reject("unreadable PNG: a compressed text chunk is cut short")
    return out


def load_card(path: Path) -> Card:
    """Read and validate a card file (JSON or PNG)."""
    try:
        if not path.is_file():
            raise CardError(str(path), ["not a regular file"])
        size = path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise CardError(
                str(path),
                [
                    f"the file is {size // 1024} KiB; cards must be at most "
                    f"{MAX_CARD_BYTES // 1024 // 1024} MiB"
                ],
            )
        with path.open("rb") as file:
            raw = file.read(MAX_CARD_BYTES + 1)
    except OSError as exc:
        raise CardError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
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
