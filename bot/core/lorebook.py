"""Card lorebooks (`character_book`): entries whose keys appear in the recent turns.

The rules follow the Character Card V2 spec as SillyTavern applies them: disabled entries never
fire; `constant` entries always do; an entry fires when one of its `keys` occurs in the scanned
text (case-insensitive unless `case_sensitive`); a `selective` entry also needs one of its
`secondary_keys`. When the entries do not all fit the lorebook's token budget, those with the
lower `priority` are left out first; the chosen ones go into the prompt in `insertion_order`.

A card may hold a thousand entries of 64 keys each, and the scanned turns may be long, so a
key is searched for only where it could occur: every word of a whole-word key must be a word
of the text, and every pair of adjacent characters of another key a pair in the text (sets
built once per scan). The searches left are counted, characters scanned per key, and stop at
`MAX_SCAN_WORK` (the more important entries are scanned first), so no card makes a reply
wait; only the newest `MAX_SCAN_CHARS` characters of the turns are scanned.

The prefilter folds case through a table of every code point, built once per process: about
0.3 s of CPU. Async code awaits `prepare_scan` before its first scan, which builds the table
in a worker thread, so that no reply's event loop stalls while it is built.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from bot.core.cards import CharacterBook, LoreEntry

log = logging.getLogger(__name__)

# The newest characters of the recent turns that are scanned for keys.
MAX_SCAN_CHARS = 100_000
# Key searches per scan, counted as characters scanned times keys searched for: a few
# hundredths of a second.
MAX_SCAN_WORK = 20_000_000

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class LoreHit:
    index: int  # position in the book: a stable key for caching its token cost
    entry: LoreEntry


def _whole_words(key: str) -> bool:
    # Word boundaries only make sense for keys that start/end with a word character in a
    # space-separated script; for CJK text (no spaces) a plain substring match is right.
    return key.isascii() and re.match(r"\w", key) is not None and re.search(r"\w$", key) is not None


def _key_regex(key: str) -> str:
    escaped = re.escape(key)
    return rf"\b{escaped}\b" if _whole_words(key) else escaped


def _build_fold_table() -> dict[int, str]:
    """Each cased character's one-character fold, such that characters an IGNORECASE search
    takes as equal fold alike: the lowercase of its uppercase (the Kelvin sign and the long s
    fold to the ASCII letters, the dotless i to i); the dotted capital I, which a search
    matches with a plain i, to i; characters whose case folding is several characters (the
    sharp s, ligatures) to the first character with that folding."""
    table: dict[int, str] = {}
    groups: dict[str, str] = {}
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        lower, upper = char.lower(), char.upper()
        if len(lower) > 1:
            folded = lower[0]
        elif len(upper) == 1 and len(upper.lower()) == 1:
            folded = upper.lower()
        else:
            full = char.casefold()
            folded = groups.setdefault(full, char) if len(full) > 1 else full
        if folded != char:
            table[code] = folded
    return table


_folds: dict[int, str] | None = None  # the fold table, once built
_folds_lock = threading.Lock()  # one thread builds it; the others wait for it


def _fold_table() -> dict[int, str]:
    """The fold table (`_build_fold_table`), built on first use and only read afterwards.
    Building it takes about 0.3 s of CPU: async code has it built off its event loop first
    (`prepare_scan`)."""
    global _folds
    table = _folds
    if table is None:
        with _folds_lock:
            if _folds is None:
                _folds = _build_fold_table()
            table = _folds
    return table


async def prepare_scan() -> None:
    """Have the fold table built in a worker thread, unless it is built already; await this
    before `matching_entries` in async code. The table is needed for the first scan of
    non-ASCII text (or keys), which a bot on Discord meets almost at once (an emoji, a curly
    quote): building it on the first scan of a card's lorebook, whatever its text, keeps the
    check simple and costs an all-ASCII bot a third of a second of a worker's CPU, once."""
    if _folds is None:
        await asyncio.to_thread(_fold_table)


def _fold(text: str) -> str:
    """`text` folded one character to one: a key can occur in a text only if its fold occurs
    in the text's fold."""
    return text.lower() if text.isascii() else text.translate(_fold_table())


class _Scan:
    """The scanned text, and the words and character pairs in it (built when first needed):
    a key none of whose occurrences could be there is not searched for."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.work = 0  # characters scanned times keys searched for, so far
        self._words: dict[bool, frozenset[str]] = {}
        self._pairs: dict[bool, frozenset[str]] = {}

    def _folded(self, text: str, case_sensitive: bool) -> str:
        return text if case_sensitive else _fold(text)

    def could_occur(self, key: str, case_sensitive: bool) -> bool:
        folded = self._folded(key, case_sensitive)
        if _whole_words(key):
            words = self._words.get(case_sensitive)
            if words is None:
                found = _WORD.findall(self.text)
                words = self._words[case_sensitive] = frozenset(
                    self._folded(w, case_sensitive) for w in found
                )
            return all(w in words for w in _WORD.findall(folded))
        pairs = self._pairs.get(case_sensitive)
        if pairs is None:
            text = self._folded(self.text, case_sensitive)
            pairs = self._pairs[case_sensitive] = frozenset(
                {text[i : i + 2] for i in range(len(text) - 1)} | set(text)
            )
        if len(folded) == 1:
            return folded in pairs
        return all(folded[i : i + 2] in pairs for i in range(len(folded) - 1))


@functools.lru_cache(maxsize=4096)
def _keys_pattern(keys: tuple[str, ...], case_sensitive: bool) -> re.Pattern[str] | None:
    """One compiled pattern for all of an entry's keys (cached: a reply scans every entry)."""
    alternatives = [_key_regex(key.strip()) for key in keys if key.strip()]
    if not alternatives:
        return None
    return re.compile("|".join(alternatives), 0 if case_sensitive else re.IGNORECASE)


def _any_key(keys: Iterable[str], scan: _Scan, case_sensitive: bool) -> bool | None:
    """Whether one of `keys` occurs in the scan; None when the scan's work is spent."""
    possible = tuple(k for k in keys if k.strip() and scan.could_occur(k.strip(), case_sensitive))
    pattern = _keys_pattern(possible, case_sensitive)
    if pattern is None:
        return False
    scan.work += len(scan.text) * len(possible)
    if scan.work > MAX_SCAN_WORK:
        return None
    return pattern.search(scan.text) is not None


def _newest(texts: Iterable[str]) -> str:
    """The texts joined, newest first, to at most MAX_SCAN_CHARS characters."""
    kept: list[str] = []
    size = 0
    for text in texts:
        kept.append(text[: MAX_SCAN_CHARS - size])
        size += len(kept[-1]) + 1
        if size >= MAX_SCAN_CHARS:
            break
    return "\n".join(kept)


def _importance(hit: LoreHit) -> tuple[int, int, int]:
    return (-(hit.entry.priority or 0), hit.entry.insertion_order, hit.index)


def matching_entries(book: CharacterBook | None, texts: Iterable[str]) -> list[LoreHit]:
    """Entries that fire for `texts` (the recent turns, newest first), most important first."""
    if book is None or not book.entries:
        return []
    scan = _Scan(_newest(texts))
    candidates = sorted(
        (
            LoreHit(index, entry)
            for index, entry in enumerate(book.entries)
            if entry.enabled and entry.content.strip()
        ),
        key=_importance,
    )
    hits: list[LoreHit] = []
    for hit in candidates:
        entry = hit.entry
        if entry.constant:
            hits.append(hit)
            continue
        case = bool(entry.case_sensitive)
        found = _any_key(entry.keys, scan, case)
        if found and entry.selective and entry.secondary_keys:
            found = _any_key(entry.secondary_keys, scan, case)
        if found is None:
            log.warning(
                "lorebook %r: keys of %d entries too many to scan; the less important left out",
                book.name,
                len(candidates),
            )
            hits += [
                h for h in candidates if h.entry.constant and _importance(h) > _importance(hit)
            ]
            hits.sort(key=_importance)
            break
        if found:
            hits.append(hit)
    return hits


def in_insertion_order(hits: Iterable[LoreHit]) -> list[LoreHit]:
    return sorted(hits, key=lambda h: (h.entry.insertion_order, h.index))
