"""How long one lorebook scan takes on the largest books a card may hold (1000 entries of 64
keys and 64 secondary keys) against 50 long recent turns, the books of
`tests/bot/test_lorebook.py`'s timing test; with `--old REV`, the same books through
`bot/core/lorebook.py` as it was at git revision REV, side by side. Prints one JSON object per
book.

    python benchmarks/lorebook_scan.py [--old REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bot.core import lorebook  # noqa: E402
from bot.core.cards import MAX_LORE_ENTRIES, MAX_LORE_KEYS, CharacterBook, LoreEntry  # noqa: E402


def module_at(rev: str) -> ModuleType:
    """`bot/core/lorebook.py` as it was at `rev`, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:bot/core/lorebook.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "lorebook_then.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("lorebook_then", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lorebook_then"] = module
    spec.loader.exec_module(module)
    return module


def largest_books() -> tuple[list[str], dict[str, CharacterBook]]:
    """50 long recent turns (ASCII words and CJK) and three books at a card's limits: random
    ASCII keys, random CJK keys, and keys whose words are all in the turns, never in order."""
    rng = random.Random(7)
    cjk = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300))

    def words(count: int, alphabet: str, size: int) -> list[str]:
        return ["".join(rng.choice(alphabet) for _ in range(size)) for _ in range(count)]

    vocabulary = words(300, string.ascii_lowercase, 6)
    turns = [
        " ".join(rng.choice(vocabulary) for _ in range(400)),
        "".join(rng.choice(cjk) for _ in range(2000)),
    ] * 25

    def book(key: Callable[[], str]) -> CharacterBook:
        return CharacterBook(
            entries=[
                LoreEntry(
                    keys=[key() for _ in range(MAX_LORE_KEYS)],
                    secondary_keys=[key() for _ in range(MAX_LORE_KEYS)],
                    selective=True,
                    content="lore",
                )
                for _ in range(MAX_LORE_ENTRIES)
            ]
        )

    return turns, {
        "ascii keys": book(lambda: words(1, string.ascii_lowercase, 8)[0]),
        "cjk keys": book(lambda: words(1, cjk, 4)[0]),
        "key words all in the turns, never in that order": book(
            lambda: " ".join(rng.sample(vocabulary, 3))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="a git revision to compare with")
    args = parser.parse_args()
    turns, books = largest_books()
    versions = {"now": lorebook} | ({"old": module_at(args.old)} if args.old else {})
    lorebook.matching_entries(books["cjk keys"], ["猫"])  # one-time set-up (the fold table)
    for name, each in books.items():
        row: dict[str, object] = {"book": name, "turn_chars": sum(len(t) for t in turns)}
        for label, module in versions.items():
            start = time.perf_counter()
            hits = module.matching_entries(each, turns)
            row[f"{label}_s"] = round(time.perf_counter() - start, 3)
            row[f"{label}_hits"] = len(hits)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
