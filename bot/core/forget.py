"""forget-me: everything the bot keeps of what one member said in one Discord server, and of
their id, removed from the database and from the files on disk, with a count of each.

1. The database (`Memory.forget_author`): their messages and ratings, the persona replies that
   answered or quote them, the approved dialogues they wrote in, approved, or that quote them,
   their id in other messages' mentions and in the retrain jobs they asked for.
2. The files: retrain work directories hold exports of approved dialogues, the cleaned and
   split data, evaluation predictions and logs. Every text file in them loses the rows that are
   the deleted dialogues (by their ids) and any line that quotes the member; the file is
   rewritten in place, its old bytes overwritten, so the text does not stay in the file's
   blocks either (on a file system that writes in place). Binary files (weights, charts) hold
   no text and are left alone; an adapter already trained on the member's words is not
   retrained (SECURITY.md says so).
3. The database file: rows are deleted with `secure_delete` on (overwritten with zeros), then
   the file is vacuumed and its write-ahead log folded in and emptied (`Memory.compact`).

The persona replies are deleted rather than redacted: a reply written in answer to a member's
message restates what they said (paraphrased, translated, answered) in ways no redaction of
the quoted span would catch, and it is the bot's own text, so deleting it loses no other
member's words. Another member's message that quotes them is that member's to keep (only the
id in its mentions is redacted); a training dialogue that holds such a quote is deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.core.memory import Forgotten, Memory
from bot.core.quotes import Quotes

log = logging.getLogger(__name__)

# Files in work directories that may hold dialogue text; the rest (weights, charts) cannot.
TEXT_SUFFIXES = frozenset({".jsonl", ".json", ".log", ".md", ".txt", ".csv", ".tsv"})
MAX_TEXT_FILE = 512 * 2**20  # larger files are not training data the bot wrote


@dataclass(frozen=True)
class ForgetReport:
    """What forget-me removed, for the member and the log."""

    database: Forgotten
    files: int  # files rewritten without the member's rows and lines
    rows: int  # rows and lines removed from them
    compacted: bool  # the database file and its log were cleared of deleted text

    def summary(self) -> str:
        gone = self.database
        parts = [
            f"{gone.turns} of your messages",
            f"{gone.replies} persona replies that answered or quoted you",
            f"{gone.dialogues} approved training dialogues that held your words or your approval",
            f"{gone.ratings} of your ratings",
        ]
        if gone.mentions:
            parts.append(f"your id from {gone.mentions} other messages that mentioned you")
        if gone.jobs:
            parts.append(f"your name from {gone.jobs} retrain requests")
        if self.files:
            parts.append(f"{self.rows} rows from {self.files} training files on disk")
        text = "Deleted " + ", ".join(parts[:-1]) + " and " + parts[-1] + " in this server."
        if not self.compacted:
            text += (
                " The database file is being written by another process; what was deleted is "
                "zeroed and will be cleared from its log shortly."
            )
        return text


async def forget_member(
    memory: Memory, guild_id: str, author_id: str, *, workdirs: Sequence[Path] = ()
) -> ForgetReport:
    """Forget a member of a guild: the database, then the files under `workdirs` (the retrain
    directory and the job directories the jobs recorded), then the database file."""
    gone = await memory.forget_author(guild_id, author_id)
    folders = list(dict.fromkeys([*workdirs, *await memory.retrain_workdirs()]))
    files, rows = 0, 0
    if gone.texts or gone.row_ids:
        files, rows = await asyncio.to_thread(scrub_files, folders, gone.row_ids, gone.texts)
    compacted = await memory.compact()
    report = ForgetReport(gone, files, rows, compacted)
    log.info(
        "forget-me in guild %s: %d turns, %d replies, %d dialogues, %d ratings, %d mentions, "
        "%d jobs, %d rows in %d files, compacted: %s",
        guild_id, gone.turns, gone.replies, gone.dialogues, gone.ratings, gone.mentions,
        gone.jobs, rows, files, compacted,
    )  # fmt: skip
    return report


def scrub_files(
    folders: Iterable[Path], row_ids: frozenset[str], texts: Sequence[str]
) -> tuple[int, int]:
    """Remove from every text file under `folders` the JSON lines whose `id` is in `row_ids`
    and every line that quotes one of `texts`; returns (files rewritten, lines removed)."""
    quotes = Quotes(texts)
    files, removed = 0, 0
    seen: set[Path] = set()
    for folder in folders:
        for path in _files(folder):
            if path in seen:
                continue
            seen.add(path)
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("forget-me could not read %s: %s", path, exc)
                continue
            lines = data.splitlines(keepends=True)
            kept = [line for line in lines if not _holds(line, row_ids, quotes)]
            if len(kept) == len(lines):
                continue
            try:
                if path.suffix.lower() == ".json":
                    # one JSON document: without a line it would be broken, so it goes whole
                    _overwrite(path, b"", len(data))
                    path.unlink()
                else:
                    _overwrite(path, b"".join(kept), len(data))
            except OSError as exc:
                log.error("forget-me could not rewrite %s: %s", path, exc)
                continue
            files += 1
            removed += len(lines) - len(kept)
    return files, removed


def _files(folder: Path) -> list[Path]:
    """The text files under `folder` (not following links), small enough to be ours; a
    folder that cannot be read is skipped with a warning, the others are still searched."""
    found = []

    def skipped(exc: OSError) -> None:
        log.warning("forget-me could not search %s: %s", exc.filename, exc.strerror or exc)

    for root, _, names in os.walk(folder, onerror=skipped):
        for name in names:
            path = Path(root) / name
            if path.suffix.lower() not in TEXT_SUFFIXES:
                continue
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                if path.stat().st_size <= MAX_TEXT_FILE:
                    found.append(path)
            except OSError as exc:
                skipped(exc)
    return found


def _holds(line: bytes, row_ids: frozenset[str], quotes: Quotes) -> bool:
    text = line.decode("utf-8", errors="replace")
    if row_ids and '"id"' in text:
        try:
            row = json.loads(text)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict) and str(row.get("id")) in row_ids:
            return True
    if quotes and quotes.found_in(text):
        return True
    if "\\u" in text:  # JSON escapes: look at the text they stand for too
        try:
            decoded = json.loads(text)
        except (ValueError, RecursionError):
            return False
        return bool(quotes) and quotes.found_in(json.dumps(decoded, ensure_ascii=False))
    return False


def _overwrite(path: Path, content: bytes, old_size: int) -> None:
    """Write `content` over the file's old bytes (zeros past its end), then cut it to size."""
    with path.open("r+b") as f:
        f.write(content)
        if old_size > len(content):
            f.write(bytes(old_size - len(content)))
        f.flush()
        os.fsync(f.fileno())
        f.truncate(len(content))
        f.flush()
        os.fsync(f.fileno())
