"""Lorebook matching: the entries that fire are those whose keys the recent turns hold, and a
card cannot make the scan slow, however many entries and keys it has."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.lorebook_scan import largest_books
from bot.core import lorebook
from bot.core.cards import CharacterBook, LoreEntry
from bot.core.lorebook import matching_entries


def _naive_fires(key: str, text: str, case_sensitive: bool) -> bool:
    """The matching rule written out plainly: a key is found as a substring, and an ASCII key
    that starts and ends with a word character only as a whole word (or words)."""
    key = key.strip()
    if not key:
        return False
    escaped = re.escape(key)
    if key.isascii() and re.match(r"\w", key) and re.search(r"\w$", key):
        escaped = rf"\b{escaped}\b"
    return re.search(escaped, text, 0 if case_sensitive else re.IGNORECASE) is not None


def _naive(book: CharacterBook, texts: list[str]) -> set[int]:
    scanned = "\n".join(texts)
    fired = set()
    for index, entry in enumerate(book.entries):
        if not entry.enabled or not entry.content.strip():
            continue
        case = bool(entry.case_sensitive)
        if entry.constant or (
            any(_naive_fires(k, scanned, case) for k in entry.keys)
            and (
                not (entry.selective and entry.secondary_keys)
                or any(_naive_fires(k, scanned, case) for k in entry.secondary_keys)
            )
        ):
            fired.add(index)
    return fired


# Text in the scripts and cases that make matching tricky: word and non-word characters,
# CJK, letters whose case folds to ASCII (the Kelvin sign, the long s), the sharp s, dotted I.
_ALPHABET = "ab AB-_.'#\n1iI猫咪の日ſKßẞİı\u0307éﬅﬆ\u0390\u1fd3"
_pieces = st.text(alphabet=_ALPHABET, max_size=8)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(_pieces, max_size=3),
            st.lists(_pieces, max_size=2),
            st.booleans(),
            st.booleans(),
        ),
        max_size=5,
    ),
    st.lists(st.text(alphabet=_ALPHABET, max_size=30), max_size=3),
)
def test_entries_fire_exactly_when_a_key_occurs(
    specs: list[tuple[list[str], list[str], bool, bool]], texts: list[str]
) -> None:
    book = CharacterBook(
        entries=[
            LoreEntry(
                keys=keys,
                secondary_keys=secondary,
                selective=selective,
                case_sensitive=case,
                content="lore",
            )
            for keys, secondary, selective, case in specs
        ]
    )
    assert {hit.index for hit in matching_entries(book, texts)} == _naive(book, texts)


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("İstanbul", "we went to istanbul"),  # the dotted capital I: a search matches a plain i
        ("istanbul", "İSTANBUL"),
        ("ıi", "II"),  # the dotless i
        ("kiss", "Kiſſ"),  # the Kelvin sign and the long s
        ("straße", "STRAẞE"),
        ("Straße", "STRASSE"),  # a search does not take ß for ss
        ("\u0390", "\u1fd3"),  # two code points of one Greek letter
        ("ﬅ", "ﬆ"),
        ("σίσυφος", "ΣΊΣΥΦΟΣ"),
    ],
)
def test_keys_fire_as_a_case_insensitive_search_finds_them(key: str, text: str) -> None:
    book = CharacterBook(entries=[LoreEntry(keys=[key], content="lore")])
    found = re.search(re.escape(key), text, re.IGNORECASE) is not None
    assert bool(matching_entries(book, [text])) == found


def test_a_book_of_the_most_keys_allowed_scans_long_turns_quickly() -> None:
    """A card may hold 1000 entries of 64 keys and 64 secondary keys; scanned against 50 long
    turns one regex search per entry took up to 9 s on a 2-core CPU, on every reply
    (`benchmarks/lorebook_scan.py`)."""
    turns, books = largest_books()
    for each in books.values():
        start = time.perf_counter()
        matching_entries(each, turns)
        # generous: a scan linear in the text and the keys takes a few hundredths of a second
        assert time.perf_counter() - start < 3.0


def test_past_the_scan_limit_the_important_entries_and_the_constant_ones_stay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    book = CharacterBook(
        entries=[
            LoreEntry(keys=["door"], content="minor", priority=0),
            LoreEntry(keys=["x"], content="always", constant=True, priority=-5),
            LoreEntry(keys=["door"], content="major", priority=10),
        ]
    )
    assert [h.entry.content for h in matching_entries(book, ["a door"])] == [
        "major",
        "minor",
        "always",
    ]
    monkeypatch.setattr(lorebook, "MAX_SCAN_WORK", len("a door"))  # one key search
    assert [h.entry.content for h in matching_entries(book, ["a door"])] == ["major", "always"]


async def test_the_fold_table_is_built_once_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`prepare_scan` builds the case-fold table off the event loop, once, however many
    replies ask for it at the same time; scans then only read it."""
    built_on: list[int] = []
    build = lorebook._build_fold_table

    def recorded() -> dict[int, str]:
        built_on.append(threading.get_ident())
        return build()

    monkeypatch.setattr(lorebook, "_folds", None)
    monkeypatch.setattr(lorebook, "_build_fold_table", recorded)
    await asyncio.gather(*(lorebook.prepare_scan() for _ in range(4)))
    assert len(built_on) == 1 and built_on[0] != threading.get_ident()
    book = CharacterBook(entries=[LoreEntry(keys=["kiss"], content="lore")])
    assert matching_entries(book, ["Kiſſ"])  # the Kelvin sign and the long s fold to ASCII
    await lorebook.prepare_scan()
    assert len(built_on) == 1
