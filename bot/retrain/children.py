"""The other packages' commands, run as child processes (`python -m rolecast ...`): the retrain
loop drives cleaning, splitting, evaluation and publishing through their command lines and
files only, so nothing here imports torch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Failed(Exception):
    """A step could not be done; the message says what broke."""


class RolecastCommands:
    """`python -m rolecast ...` with the interpreter the loop runs under (or another)."""

    def __init__(self, python: str) -> None:
        self.python = python

    async def run(self, args: list[str], log_path: Path | None) -> tuple[int, str]:
        """Run `rolecast ARGS`; returns the exit code and its output (stdout and stderr)."""
        argv = [self.python, "-m", "rolecast", *args]
        log.info("running %s", shlex.join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:  # no such interpreter, not executable...
            raise Failed(
                f"could not start {self.python!r} (retrain.python): {exc.strerror or exc}"
            ) from None
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            raise
        text = out.decode(errors="replace")
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a", encoding="utf-8") as f:
                f.write(f"$ {shlex.join(argv)}\n{text}[exit {proc.returncode}]\n")
        return int(proc.returncode or 0), text

    async def check(self, what: str, args: list[str], log_path: Path) -> str:
        """Run `rolecast ARGS`; Failed with the last lines of its output if it fails."""
        started = time.monotonic()
        code, text = await self.run(args, log_path)
        if code != 0:
            tail = "\n".join([line for line in text.splitlines() if line.strip()][-8:])
            raise Failed(f"{what} failed (exit code {code}):\n{tail}")
        log.info("%s took %.1f s", what, time.monotonic() - started)
        return text


def json_result(output: str) -> dict[str, Any] | None:
    """The `{"type": "result", ...}` line a command printed with `--json`, if any."""
    for line in reversed(output.splitlines()):
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("type") == "result":
            return data
    return None
