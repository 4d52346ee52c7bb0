"""Dialogue datasets: reading ShareGPT / OpenAI JSONL, row checks, cleaning and splitting.

The row shapes (ShareGPT and OpenAI, as LLaMA-Factory reads them) and `dataset_info.json` are
`formats.sharegpt`'s; inside the package a dialogue is always a list of OpenAI-style
``{"role", "content"}`` messages, which is what the tokenizer's chat template takes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, TextIO

from finetune.dedup import check_threshold
from finetune.errors import DataError, RefusedDialogue
from formats import jsonfile, sharegpt
from formats.errors import FormatError
from formats.jsonfile import Line, replacing
from formats.sharegpt import ASSISTANT, SYSTEM, USER, Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one row."""

    row_id: str
    source: str  # "file:line"
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.row_id} ({self.source}): {self.code}: {self.message}"


@dataclass
class Row:
    """One line of a JSONL file, parsed as far as it goes."""

    row_id: str
    source: str
    messages: list[Message] | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """Whether `messages` are the row's whole dialogue: every turn could be read (a row
        whose id is a duplicate is still whole)."""
        return self.messages is not None and all(p.code == "duplicate_id" for p in self.problems)


@dataclass(frozen=True)
class Dialogue:
    """A usable dialogue: system prompt optional, user/assistant alternating, ends on assistant."""

    row_id: str
    messages: list[Message]

    def text(self) -> str:
        """The non-system text, for near-duplicate detection."""
        return "\n".join(m["content"] for m in self.messages if m["role"] != SYSTEM)


@dataclass
class LengthStats:
    unit: str
    count: int
    total: int
    mean: float
    minimum: int
    p50: int
    p90: int
    p99: int
    maximum: int

    @classmethod
    def of(cls, lengths: Sequence[int], unit: str) -> LengthStats:
        if not lengths:
            return cls(unit, 0, 0, 0.0, 0, 0, 0, 0, 0)
        ordered = sorted(lengths)

        def pct(q: float) -> int:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return cls(
            unit=unit,
            count=len(ordered),
            total=sum(ordered),
            mean=round(statistics.fmean(ordered), 1),
            minimum=ordered[0],
            p50=pct(0.5),
            p90=pct(0.9),
            p99=pct(0.99),
            maximum=ordered[-1],
        )


@dataclass
class CheckReport:
    """What `rolecast data check` found in one or more files."""

    files: list[str]
    rows: int
    problems: list[Problem]
    duplicate_groups: list[list[str]]
    lengths: LengthStats

    @property
    def bad_row_ids(self) -> set[str]:
        return {p.row_id for p in self.problems}

    @property
    def rows_with_problems(self) -> int:
        """Rows, not ids: a repeated id names two rows."""
        return _rows_of_problems(self.problems)

    @property
    def usable_rows(self) -> int:
        return self.rows - self.rows_with_problems

    def to_json(self) -> dict[str, Any]:
        by_code: dict[str, int] = {}
        for p in self.problems:
            by_code[p.code] = by_code.get(p.code, 0) + 1
        return {
            "files": self.files,
            "rows": self.rows,
            "rows_with_problems": self.rows_with_problems,
            "usable_rows": self.usable_rows,
            "problems_by_code": by_code,
            "problems": [
                {"id": p.row_id, "source": p.source, "code": p.code, "message": p.message}
                for p in self.problems
            ],
            "near_duplicate_groups": self.duplicate_groups,
            "lengths": self.lengths.__dict__,
        }


def _rows_of_problems(problems: Iterable[Problem]) -> int:
    """How many rows `problems` are about (a row is its place in a file, whatever its id)."""
    return len({(p.source, p.row_id) for p in problems})


# ---------------------------------------------------------------------------------------------
# reading


def _parse_messages(
    obj: Any, row_id: str, source: str
) -> tuple[list[Message] | None, list[Problem]]:
    messages, found = sharegpt.read_messages(obj)
    return messages, [Problem(row_id, source, code, message) for code, message in found]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _repair(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (for ids shown in a report)."""
    return _SURROGATE.sub("\ufffd", text)


def _unencodable(obj: Any, where: str = "row") -> str | None:
    """Where a parsed row holds text that cannot be encoded (a lone surrogate), or None."""
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, str):
            if (match := _SURROGATE.search(value)) is not None:
                return (
                    f"{at} has an unpaired surrogate {match.group()!r} at character "
                    f"{match.start()}: the text cannot be encoded"
                )
        elif isinstance(value, list):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                label = _repair(str(key))[:40]
                stack.append((key, f"{at} key {label!r}"))
                stack.append((item, f"{at}.{label}"))
    return None


def read_jsonl(path: str | Path) -> list[Line]:
    """The non-blank lines of a JSONL file, parsed (`formats.jsonfile.read_jsonl`); bad lines
    say why, not raise. DataError when it cannot be read."""
    try:
        return jsonfile.read_jsonl(path)
    except FormatError as exc:
        raise DataError(str(exc)) from None


def read_rows(path: str | Path) -> list[Row]:
    """Every line of a JSONL file as a Row; bad lines become rows with problems, not exceptions."""
    path = Path(path)
    rows: list[Row] = []
    seen: dict[str, str] = {}
    for line in read_jsonl(path):
        source = _repair(f"{path.name}:{line.number}")
        fallback_id = _repair(f"{path.stem}:{line.number}")
        if line.code is not None:
            problem = Problem(fallback_id, source, line.code, line.message)
            rows.append(Row(fallback_id, source, None, [problem]))
            continue
        obj = line.value
        row_id = sharegpt.row_id(obj, fallback_id)
        if (bad := _unencodable(obj)) is not None:
            # JSON escapes can carry lone UTF-16 surrogates ("\ud800"), which no encoder
            # accepts: such a row can be neither tokenized nor written back.
            row_id = _repair(row_id)
            problem = Problem(row_id, source, "bad_text", bad)
            rows.append(Row(row_id, source, None, [problem]))
            continue
        messages, problems = _parse_messages(obj, row_id, source)
        if row_id in seen:
            problems.append(
                Problem(row_id, source, "duplicate_id", f"id already used at {seen[row_id]}")
            )
        seen.setdefault(row_id, source)
        rows.append(Row(row_id, source, messages, problems))
    return rows


# ---------------------------------------------------------------------------------------------
# checks


def structure_problems(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(code, message) for each way `messages` is not a trainable dialogue."""
    found: list[tuple[str, str]] = []
    for number, m in enumerate(messages, start=1):
        if m["role"] == SYSTEM and number != 1:
            found.append(("system_not_first", f"turn {number} is a system turn after the start"))
        if not m["content"].strip():
            found.append(("empty_text", f"turn {number} ({m['role']}) has empty text"))
    turns = [(n, m["role"]) for n, m in enumerate(messages, start=1) if m["role"] != SYSTEM]
    if not turns:
        return [*found, ("no_assistant", "has no user or assistant turn")]
    if turns[0][1] == ASSISTANT:
        found.append(
            ("starts_on_assistant", f"turn {turns[0][0]} is an assistant turn before any user turn")
        )
    for (n1, r1), (n2, r2) in pairwise(turns):
        if r1 == r2 == USER:
            found.append(("user_twice", f"turns {n1} and {n2} are two user turns in a row"))
        elif r1 == r2 == ASSISTANT:
            found.append(
                ("assistant_twice", f"turns {n1} and {n2} are two assistant turns in a row")
            )
    if not any(r == ASSISTANT for _, r in turns):
        found.append(("no_assistant", "has no assistant turn"))
    elif turns[-1][1] == USER:
        found.append(("ends_on_user", f"ends on a user turn (turn {turns[-1][0]})"))
    return found


TokenCounter = Callable[[Sequence[Message]], int]


def check_rows(
    rows: Sequence[Row],
    count_tokens: TokenCounter | None = None,
    max_length: int | None = None,
) -> list[Problem]:
    """All problems of `rows`: parse problems, structure problems and (with a counter) length."""
    problems: list[Problem] = []
    for row in rows:
        problems.extend(row.problems)
        if not row.whole or row.messages is None:
            continue  # with a turn left out, the messages are not the file's dialogue
        found = structure_problems(row.messages)
        for code, message in found:
            problems.append(Problem(row.row_id, row.source, code, message))
        if count_tokens is not None and max_length is not None:
            measured = _length_problems(
                row.row_id, row.source, row.messages, count_tokens, max_length
            )
            # a strict template refuses roles out of turn, which are reported already
            problems.extend(p for p in measured if not (found and p.code == "template_refused"))
    return problems


def _length_problems(
    row_id: str,
    source: str,
    messages: Sequence[Message],
    count_tokens: TokenCounter,
    max_length: int,
) -> list[Problem]:
    """`too_long` when the templated dialogue is over `max_length` tokens, `template_refused`
    when the chat template will not render it at all."""
    try:
        n = count_tokens(messages)
    except RefusedDialogue as exc:
        return [Problem(row_id, source, "template_refused", str(exc))]
    if n > max_length:
        return [
            Problem(row_id, source, "too_long", f"{n} tokens, over the context of {max_length}")
        ]
    return []


def check_files(
    paths: Iterable[str | Path],
    count_tokens: TokenCounter | None = None,
    max_length: int | None = None,
    dedup_threshold: float = 0.85,
) -> CheckReport:
    """Read and check files; near-duplicates and lengths are computed over well-formed rows."""
    paths = [Path(p) for p in paths]
    rows = [row for p in paths for row in read_rows(p)]
    problems = check_rows(rows, count_tokens, max_length)
    parsed = [r for r in rows if r.messages and r.whole]
    groups = near_duplicate_groups_of(
        [
            (r.row_id, "\n".join(m["content"] for m in r.messages or [] if m["role"] != SYSTEM))
            for r in parsed
        ],
        dedup_threshold,
    )
    whole = [r.messages or [] for r in parsed]
    if count_tokens is not None:  # of the dialogues the chat template renders
        counts = [_tokens(count_tokens, messages) for messages in whole]
        lengths = LengthStats.of([n for n in counts if n is not None], "tokens")
    else:
        lengths = LengthStats.of(
            [sum(len(m["content"]) for m in messages) for messages in whole], "characters"
        )
    return CheckReport([str(p) for p in paths], len(rows), problems, groups, lengths)


def _tokens(count_tokens: TokenCounter, messages: Sequence[Message]) -> int | None:
    """The dialogue's length in tokens; None when the chat template refuses it."""
    try:
        return count_tokens(messages)
    except RefusedDialogue:
        return None


def near_duplicate_groups_of(items: Sequence[tuple[str, str]], threshold: float) -> list[list[str]]:
    from finetune.dedup import near_duplicate_groups

    return near_duplicate_groups(items, threshold=threshold)


# ---------------------------------------------------------------------------------------------
# cleaning, splitting, writing


@dataclass
class CleanResult:
    kept: list[Dialogue]
    dropped: list[Problem]  # one entry per dropped row: why
    trimmed: list[str]  # ids whose trailing user turns were cut


def trim_trailing_user(messages: Sequence[Message]) -> list[Message]:
    """Cut the user turns after the last assistant turn (they have no reply to learn)."""
    out = list(messages)
    while out and out[-1]["role"] == USER:
        out.pop()
    return out


def clean_rows(
    rows: Sequence[Row],
    count_tokens: TokenCounter | None = None,
    max_length: int | None = None,
    trim: bool = True,
    dedup_threshold: float | None = 0.85,
) -> CleanResult:
    """Keep the usable dialogues.

    Rows whose only defect is ending on a user turn are kept with those last user turns cut
    (`trim`), since every reply before them is still good training signal; any other defect
    drops the row. Of each near-duplicate group only the first row is kept.
    """
    if dedup_threshold is not None:
        check_threshold(dedup_threshold)
    kept: list[Dialogue] = []
    dropped: list[Problem] = []
    trimmed: list[str] = []
    seen_ids: set[str] = set()
    for row in rows:
        if row.problems or row.messages is None:
            dropped.extend(row.problems[:1])
            continue
        messages = row.messages
        codes = structure_problems(messages)
        if trim and codes and all(code == "ends_on_user" for code, _ in codes):
            messages = trim_trailing_user(messages)
            codes = structure_problems(messages)
            if not codes:
                trimmed.append(row.row_id)
        if codes:
            dropped.append(Problem(row.row_id, row.source, codes[0][0], codes[0][1]))
            continue
        if count_tokens is not None and max_length is not None:
            if too_long := _length_problems(
                row.row_id, row.source, messages, count_tokens, max_length
            ):
                dropped.append(too_long[0])
                continue
        if row.row_id in seen_ids:
            dropped.append(Problem(row.row_id, row.source, "duplicate_id", "id already used"))
            continue
        seen_ids.add(row.row_id)
        kept.append(Dialogue(row.row_id, messages))

    if dedup_threshold is not None and kept:
        groups = near_duplicate_groups_of([(d.row_id, d.text()) for d in kept], dedup_threshold)
        drop_ids = {i: g[0] for g in groups for i in g[1:]}
        if drop_ids:
            sources = {r.row_id: r.source for r in rows}
            for d in kept:
                if d.row_id in drop_ids:
                    dropped.append(
                        Problem(
                            d.row_id,
                            sources.get(d.row_id, "?"),
                            "near_duplicate",
                            f"near-duplicate of {drop_ids[d.row_id]}",
                        )
                    )
            kept = [d for d in kept if d.row_id not in drop_ids]
    return CleanResult(kept, dropped, trimmed)


def split_dialogues(
    dialogues: Sequence[Dialogue], validation_fraction: float = 0.1, seed: int = 42
) -> tuple[list[Dialogue], list[Dialogue]]:
    """A reproducible train/validation split.

    Rows are ordered by a hash of (seed, id), so the split depends only on the ids and the seed,
    not on file order, and adding rows later does not move existing ones across the split.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    n_val = max(1, round(len(dialogues) * validation_fraction))
    if n_val >= len(dialogues):
        raise DataError(f"{len(dialogues)} dialogues are too few to split")

    def key(d: Dialogue) -> str:
        return hashlib.sha256(f"{seed}:{d.row_id}".encode()).hexdigest()

    val_ids = {d.row_id for d in sorted(dialogues, key=key)[:n_val]}
    train = [d for d in dialogues if d.row_id not in val_ids]
    val = [d for d in dialogues if d.row_id in val_ids]
    return train, val


def to_sharegpt(dialogue: Dialogue) -> dict[str, Any]:
    return sharegpt.sharegpt_row(dialogue.row_id, dialogue.messages)


@contextmanager
def writing(path: str | Path) -> Iterator[TextIO]:
    """A text file to write that replaces `path` whole or not at all (`formats.jsonfile.replacing`),
    its missing folders made; DataError, one line, when it cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the output a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"{path} cannot be written: {path.parent} is not a folder") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be written: {exc.strerror or exc}") from None
    try:
        with replacing(path) as fh:
            yield fh
    except OSError as exc:
        raise DataError(f"{path} cannot be written: {exc.strerror or exc}") from None


def write_jsonl(dialogues: Iterable[Dialogue], path: str | Path) -> int:
    """Write `dialogues` as ShareGPT JSONL in place of `path` (which may be their source)."""
    n = 0
    with writing(path) as fh:
        for d in dialogues:
            fh.write(sharegpt.jsonl_line(to_sharegpt(d)))
            n += 1
    return n


def write_dataset_info(directory: str | Path, names: Sequence[str]) -> Path:
    """A `dataset_info.json` that LLaMA-Factory reads as is, one entry per JSONL file in `directory`."""
    path = Path(directory) / sharegpt.DATASET_INFO
    with writing(path) as fh:
        fh.write(sharegpt.dataset_info_bytes({name: f"{name}.jsonl" for name in names}).decode())
    return path


def load_dialogues(
    path: str | Path,
    count_tokens: TokenCounter | None = None,
    max_length: int | None = None,
) -> list[Dialogue]:
    """The dialogues of a file that training can use as they are; any bad row raises DataError."""
    rows = read_rows(path)
    problems = check_rows(rows, count_tokens, max_length)
    if problems:
        bad = _rows_of_problems(problems)
        raise DataError(
            f"{path}: {bad} of {len(rows)} rows cannot be trained on; fix them or run "
            f"`rolecast data clean {path}` first",
            [str(p) for p in problems],
        )
    if not rows:
        raise DataError(f"{path} holds no dialogues")
    return [Dialogue(r.row_id, r.messages or []) for r in rows]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
