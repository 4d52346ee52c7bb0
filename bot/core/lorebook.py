"""Card lorebooks (`character_book`): entries whose keys appear in the recent turns.

The rules follow the Character Card V2 spec as SillyTavern applies them: disabled entries never
fire; `constant` entries always do; an entry fires when one of its `keys` occurs in the scanned
text (case-insensitive unless `case_sensitive`); a `selective` entry also needs one of its
`secondary_keys`. When the entries do not all fit the lorebook's token budget, those with the
lower `priority` are left out first; the chosen ones go into the prompt in `insertion_order`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from bot.core.cards import CharacterBook, LoreEntry


@dataclass(frozen=True)
class LoreHit:
    index: int  # position in the book: a stable key for caching its token cost
    entry: LoreEntry


def _key_regex(key: str) -> str:
    escaped = re.escape(key)
    # Word boundaries only make sense for keys that start/end with a word character in a
    # space-separated script; for CJK text (no spaces) a plain substring match is right.
    if key.isascii() and re.match(r"\w", key) and re.search(r"\w$", key):
        escaped = rf"\b{escaped}\b"
    return escaped


@functools.lru_cache(maxsize=4096)
def _keys_pattern(keys: tuple[str, ...], case_sensitive: bool) -> re.Pattern[str] | None:
    """One compiled pattern for all of an entry's keys (cached: a reply scans every entry)."""
    alternatives = [_key_regex(key.strip()) for key in keys if key.strip()]
    if not alternatives:
        return None
    return re.compile("|".join(alternatives), 0 if case_sensitive else re.IGNORECASE)


def _any_key(keys: Iterable[str], text: str, case_sensitive: bool) -> bool:
    pattern = _keys_pattern(tuple(keys), case_sensitive)
    return pattern is not None and pattern.search(text) is not None


def matching_entries(book: CharacterBook | None, texts: Iterable[str]) -> list[LoreHit]:
    """Entries that fire for `texts` (the recent turns), most important first."""
    if book is None or not book.entries:
        return []
    scanned = "\n".join(texts)
    hits: list[LoreHit] = []
    for index, entry in enumerate(book.entries):
        if not entry.enabled or not entry.content.strip():
            continue
        if entry.constant:
            hits.append(LoreHit(index, entry))
            continue
        case = bool(entry.case_sensitive)
        if not _any_key(entry.keys, scanned, case):
            continue
        if entry.selective and entry.secondary_keys:
            if not _any_key(entry.secondary_keys, scanned, case):
                continue
        hits.append(LoreHit(index, entry))
    hits.sort(key=lambda h: (-(h.entry.priority or 0), h.entry.insertion_order, h.index))
    return hits


def in_insertion_order(hits: Iterable[LoreHit]) -> list[LoreHit]:
    return sorted(hits, key=lambda h: (h.entry.insertion_order, h.index))
