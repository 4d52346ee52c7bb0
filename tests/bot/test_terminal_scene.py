"""`rolecast chat` with several personas: a scene in the terminal, end to end (real processes,
real SQLite; the instant server for replies that say who spoke, and the embedded server with a
tiny model for the real path)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.core.sidecar import EmbeddedServer
from tests.bot.test_terminal_chat import chat, server
from tests.instant_server import InstantServer, ServerState

__all__ = ["server"]  # the embedded server with a tiny model (module-wide)

_NOTE = re.compile(r"Write only (.+?)'s next reply\.")


def reply(body: dict[str, Any]) -> str:
    """`<who> to <what it answers>`; 凉宫春日 also hands the turn to ATRI."""
    found = _NOTE.search(body["messages"][0]["content"])
    who = found.group(1) if found else "alone"
    last = body["messages"][-1]["content"].split("\n")[-1]
    return f"{who} to {last}" + (" — ATRI?" if who == "凉宫春日" else "")


@pytest.fixture(scope="module")
def instant() -> Iterator[InstantServer]:
    with InstantServer(ServerState(reply=reply)) as running:
        yield running


def rows(home: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(home / "rolecast.db") as conn:
        return list(conn.execute("SELECT persona, role, content FROM turns ORDER BY id"))


def test_a_scene_in_the_terminal(instant: InstantServer, tmp_path: Path) -> None:
    lines = [
        "good morning",  # nobody named: one reply, the first in turn; she names ATRI
        "what now?",  # the next in turn after ATRI
        "xin and atri, you two?",  # both, in the order named
        "/next xin",
        "and then?",  # handed to 星锑
        "凉宫春日, lead us",
        "/turns keywords 0",
        "robot stories!",  # keywords: ATRI's card is tagged robot; no chain any more
    ]
    result = chat(
        tmp_path,
        *("--persona", "haruhi", "--persona", "atri", "--persona", "xin"),
        stdin="\n".join(lines).encode(),
        server_url=instant.base_url,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out == [
        "凉宫春日: 凉宫春日 to good morning — ATRI?",
        # ATRI answers her (the chain), the limit of 2 bot turns is reached
        "ATRI: ATRI to 凉宫春日 to good morning — ATRI?",
        "星锑: 星锑 to what now?",
        "星锑: 星锑 to xin and atri, you two?",
        "ATRI: ATRI to xin and atri, you two?",
        "星锑: 星锑 to and then?",
        "凉宫春日: 凉宫春日 to 凉宫春日, lead us — ATRI?",
        "ATRI: ATRI to 凉宫春日 to 凉宫春日, lead us — ATRI?",
        "haruhi       凉宫春日",  # /turns shows the cast and its rules
        "atri         ATRI",
        "xin          星锑",
        "lines that name nobody: keywords; at most 0 bot turns in a row",
        "ATRI: ATRI to robot stories!",
    ]
    for name in ("凉宫春日", "ATRI", "星锑"):
        assert f"{name} answers through instant-base" in result.stderr
    stored = rows(tmp_path)
    greetings = [r for r in stored if r[1] == "assistant"][:3]
    assert [p for p, _, _ in greetings] == ["haruhi", "atri", "xin"]  # each one's first_mes
    assert ("xin", "user", "and then?") in stored

    # a new process without --persona goes on with the scene (and its settings)
    again = chat(tmp_path, stdin=b"a robot?\n", server_url=instant.base_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["ATRI: ATRI to a robot?"]
    # one --persona: a session with one persona again, as before scenes
    alone = chat(tmp_path, "--persona", "xin", stdin=b"just us\n", server_url=instant.base_url)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.splitlines() == ["alone to just us"]  # no scene note, no name


def test_retry_and_history_in_a_scene(instant: InstantServer, tmp_path: Path) -> None:
    result = chat(
        tmp_path,
        *("--persona", "atri", "--persona", "xin"),
        stdin=b"xin, hello\n/retry\n/history 3\n",
        server_url=instant.base_url,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "星锑: 星锑 to xin, hello",
        "星锑: 星锑 to xin, hello",  # asked again, of the same persona
        "星锑> 嗨嗨～我是星锑！今天想聊点什么呢？",  # /history: each turn under its speaker
        "User> xin, hello",
        "星锑> 星锑 to xin, hello",
    ]
    # the retried reply replaced the first one
    assert rows(tmp_path)[2:] == [
        ("xin", "user", "xin, hello"),
        ("xin", "assistant", "星锑 to xin, hello"),
    ]


def test_a_scene_on_the_embedded_server(server: EmbeddedServer, tmp_path: Path) -> None:
    result = chat(
        tmp_path,
        *("--persona", "haruhi", "--persona", "atri"),
        stdin="凉宫春日和ATRI，你们好\n".encode(),
        server_url=server.base_url,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert [line.split(":")[0] for line in out] == ["凉宫春日", "ATRI"]
    stored = rows(tmp_path)
    assert [(p, r) for p, r, _ in stored[-3:]] == [
        ("haruhi", "user"),
        ("haruhi", "assistant"),
        ("atri", "assistant"),
    ]


def test_hostile_names_and_numbers_at_the_prompt(instant: InstantServer, tmp_path: Path) -> None:
    # A card name that would drive the terminal (set its title, clear the screen), and
    # numbers no command can take: every line is answered, nothing reaches the terminal raw.
    name = "Evil\x1b]0;pwned\x07\x1b[2J"
    (tmp_path / "personas").mkdir()
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name}}
    (tmp_path / "personas" / "evil.json").write_text(json.dumps(card))
    huge = "99999999999999999999"
    lines = ["/next evil", "/turns ²", f"/turns {huge}", "/sampling evil seed=1", "/cast"]
    lines += ["evil, hello", f"/history {huge}"]
    scene = chat(
        tmp_path,
        *("--persona", "evil", "--persona", "atri"),
        stdin="\n".join(lines).encode(),
        server_url=instant.base_url,
    )
    single = chat(
        tmp_path,
        "--persona",
        "evil",
        stdin=f"/persona\n/persona evil\n/history {huge}\n".encode(),
        server_url=instant.base_url,
    )
    for result in (scene, single):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        printed = result.stdout + result.stderr
        assert "\x1b" not in printed and "\x07" not in printed
    shown = "Evil]0;pwned[2J"
    assert f"{shown} answers the next line that names nobody" in scene.stderr
    assert scene.stderr.count("usage: /turns") == 2
    assert f"{shown}: seed = 1" in scene.stderr
    assert f"(next: {shown})" in scene.stdout
    assert "User> evil, hello" in scene.stdout  # /history: every turn
    assert f"Current persona: {shown} (evil)" in single.stdout
    assert f"Now chatting with {shown} (evil)" in single.stderr
    assert f"{shown} answers through" in single.stderr
