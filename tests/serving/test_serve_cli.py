"""`rolecast serve` says where it listens, once it does: one line on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bot.core.sidecar import EmbeddedServer


def test_serve_prints_its_address_when_ready(
    launch: Callable[[Path, list[str]], EmbeddedServer], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = launch(tmp_path, ["--model", str(tiny_model_dir), "--max-model-len", "256"])
    expected = f"serving on {server.url} (OpenAI API at {server.url}/v1)"
    log = tmp_path / "server.log"  # the server's stdout and stderr
    deadline = time.monotonic() + 10
    while expected not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    assert lines.count(expected) == 1, lines
