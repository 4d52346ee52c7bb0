"""`rolecast chat` at a real terminal (a pseudo-terminal): Ctrl-C stops a streamed reply and the
chat goes on; a second Ctrl-C at the prompt, or Ctrl-D, leaves. The model server streams slowly
(the instant server with a per-token delay), so a reply is still streaming when Ctrl-C comes."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.instant_server import InstantServer, ServerState

LONG_REPLY = " ".join(f"word{i}" for i in range(200))


@pytest.fixture
def slow_server() -> Iterator[InstantServer]:
    state = ServerState(reply=lambda body: LONG_REPLY, token_delay_s=0.05)
    with InstantServer(state) as server:
        yield server


class Terminal:
    """`rolecast chat` on a pseudo-terminal: what it printed, typing, and Ctrl-C."""

    def __init__(self, home: Path, server: InstantServer) -> None:
        master, slave = pty.openpty()
        env = {**os.environ, "ROLECAST_HOME": str(home), "TERM": "dumb", "COLUMNS": "200"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rolecast", "chat", "--persona", "haruhi",
             "--server", server.base_url],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self.seen = b""

    def read_until(self, pattern: str, within_s: float = 60) -> str:
        deadline = time.monotonic() + within_s
        while not re.search(pattern, self.text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in:\n{self.text()}")
            self.seen += self._read(0.1)
        return self.text()

    def _read(self, within_s: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], within_s)
        if not ready:
            return b""
        try:
            return os.read(self.master, 4096)
        except OSError:  # the chat has closed the terminal
            time.sleep(within_s)
            return b""

    def text(self) -> str:
        return self.seen.decode("utf-8", "replace").replace("\r", "")

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def ctrl_c(self) -> None:
        os.kill(self.proc.pid, signal.SIGINT)

    def close(self, within_s: float = 30) -> int:
        """Wait for the chat to end, reading what it prints meanwhile; its exit code."""
        deadline = time.monotonic() + within_s
        try:
            while self.proc.poll() is None:
                if time.monotonic() > deadline:
                    self.proc.kill()
                    raise AssertionError(f"the chat did not end:\n{self.text()}")
                self.seen += self._read(0.1)
            return self.proc.returncode
        finally:
            os.close(self.master)


def turns(home: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(home / "rolecast.db") as conn:
        return list(conn.execute("SELECT role, content FROM turns ORDER BY id"))


def test_ctrl_c_stops_the_reply_and_a_second_one_leaves(
    slow_server: InstantServer, tmp_path: Path
) -> None:
    term = Terminal(tmp_path, slow_server)
    term.read_until(r"you> ")
    term.type("讲个长故事")
    term.read_until(r"word5 ")  # the reply is streaming
    term.ctrl_c()
    term.read_until(r"Reply stopped; your message is kept")
    term.read_until(r"you> $")  # back at the prompt, the process alive
    assert term.proc.poll() is None
    assert "word199" not in term.text()
    # the user's turn is kept; the stopped reply is not stored as if it were whole
    assert turns(tmp_path)[-1] == ("user", "讲个长故事")
    term.ctrl_c()  # right after a stopped reply: a second Ctrl-C in a row leaves
    assert term.close() == 0
    assert "Traceback" not in term.text()


def test_one_ctrl_c_at_the_prompt_only_says_how_to_leave(
    slow_server: InstantServer, tmp_path: Path
) -> None:
    term = Terminal(tmp_path, slow_server)
    term.read_until(r"you> ")
    term.ctrl_c()
    term.read_until(r"Ctrl-C again or Ctrl-D leaves")
    term.read_until(r"you> $")
    time.sleep(0.3)
    assert term.proc.poll() is None  # one Ctrl-C at the prompt does not leave
    term.type("/history 1")  # typing something starts the count again
    term.read_until(r"(?s)/history 1\n.*我对普通.*you> $")  # its answer, then the prompt
    term.ctrl_c()
    term.read_until(r"(?s)Ctrl-C again or Ctrl-D leaves.*Ctrl-C again or Ctrl-D leaves")
    time.sleep(0.3)
    assert term.proc.poll() is None
    term.ctrl_c()
    assert term.close() == 0


def test_ctrl_d_leaves(slow_server: InstantServer, tmp_path: Path) -> None:
    term = Terminal(tmp_path, slow_server)
    term.read_until(r"you> ")
    os.write(term.master, b"\x04")  # Ctrl-D
    assert term.close() == 0
    assert "Traceback" not in term.text()
