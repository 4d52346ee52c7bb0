"""JSON files: read a JSON object file or a JSONL file, or replace a file atomically (a reader
sees the old file or the new one, never half of either)."""

from __future__ import annotations

import codecs
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from formats.errors import FormatError

#: The largest JSON file read: these files (configs, manifests, pointers) are a few KiB.
MAX_BYTES = 16 * 2**20


def read_object(path: Path, *, max_bytes: int = MAX_BYTES) -> dict[str, Any] | None:
    """The JSON object in `path`; None when the file is missing. Raises ValueError when it
    holds something else than one JSON object, is larger than `max_bytes`, nests too deep or
    cannot be read (a directory, no permission)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes // 2**20} MiB")
    try:
        data = json.loads(raw.decode("utf-8"))  # json.JSONDecodeError is a ValueError
    except RecursionError:
        raise ValueError(f"{path} nests too deep") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


@dataclass(frozen=True)
class Line:
    """One non-blank line of a JSONL file: its value, or why it has none."""

    number: int
    value: Any = None
    code: str | None = None  # "bad_utf8" or "bad_json" when the line is not UTF-8 JSON
    message: str = ""


def read_jsonl(path: str | Path) -> list[Line]:
    """The non-blank lines of a JSONL file, parsed; bad lines say why, not raise. Lines end at
    "\\n" only, as JSONL says: the other characters `str.splitlines` breaks at (U+2028, U+0085,
    a form feed...) may stand raw inside a JSON string. The file may start with a byte order mark
    and end its lines in CRLF. FormatError when it is not a file that can be read."""
    path = Path(path)
    try:
        with _open_data_file(path) as fh:
            return [line for n, raw in enumerate(fh, start=1) if (line := _line(n, raw))]
    except OSError as exc:
        raise FormatError(f"{path} cannot be read: {exc.strerror or exc}") from None


def require_data_file(path: str | Path) -> None:
    """FormatError now if `path` is not a data file that can be opened: commands check their
    files before slow work (loading a tokenizer can mean converting a model first)."""
    path = Path(path)
    try:
        _open_data_file(path).close()
    except OSError as exc:
        raise FormatError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _open_data_file(path: Path) -> BinaryIO:
    """`path` opened for reading, or FormatError saying why it is not a data file."""
    if path.is_dir():
        raise FormatError(f"{path} is a directory, not a data file")
    if not path.exists():
        raise FormatError(f"no such data file: {path}")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise FormatError(f"{path} is not a regular file")
    return path.open("rb")  # binary: iterating it splits at b"\n" only


def _line(number: int, raw: bytes) -> Line | None:
    """Line `number` parsed (None when blank)."""
    if number == 1:  # editors on Windows start UTF-8 files with a byte order mark
        raw = raw.removeprefix(codecs.BOM_UTF8)
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Line(number, code="bad_utf8", message=str(exc))
    try:
        return Line(number, json.loads(text))
    except RecursionError:
        return Line(number, code="bad_json", message="nests too deep")
    except ValueError as exc:  # also absurd numbers
        return Line(number, code="bad_json", message=str(exc)[:300])


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over."""
    with replacing(path) as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


@contextmanager
def replacing(path: Path) -> Iterator[TextIO]:
    """A UTF-8 text file to write in place of `path`: a temporary file beside it, flushed to
    disk and renamed over `path` when the block ends, removed when the block raises (so `path`
    may be the file the text was read from)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; model servers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
