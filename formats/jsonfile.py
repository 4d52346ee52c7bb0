"""JSON object files: read one, or replace one atomically (a reader sees the old file or the
new one, never half of either)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

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
