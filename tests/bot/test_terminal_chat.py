"""`rolecast chat` end to end: real processes, a real embedded server on loopback, real SQLite.

The server runs a tiny random model with SmolLM2's tokenizer and chat template, so replies are
gibberish but every part between the keyboard and the weights is the real one.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.core.client import ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from bot.core.prompt import PromptBuilder
from bot.core.sidecar import EmbeddedServer, free_port

CONTEXT = 1536


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(tiny_model_dir), "--max-model-len", str(CONTEXT)]
    with EmbeddedServer(args, log_path=log, startup_timeout=180) as running:
        yield running


def chat(
    home: Path, *args: str, stdin: bytes, server_url: str | None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rolecast", "chat", "--max-tokens", "12", "--seed", "0", *args]
    if server_url is not None:
        cmd += ["--server", server_url]
    full_env = {
        **os.environ,
        "ROLECAST_HOME": str(home),
        "ROLECAST_RETRY_MAX_WAIT_S": "0.1",
        **(env or {}),
    }
    return _run(cmd, stdin, full_env)


def _run(cmd: list[str], stdin: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=300, check=False)
    return subprocess.CompletedProcess(
        cmd,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def turns(home: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(home / "rolecast.db") as conn:
        return list(conn.execute("SELECT channel_id, role, content FROM turns ORDER BY id"))


def test_two_turns_then_a_restart_remembers(server: EmbeddedServer, tmp_path: Path) -> None:
    first = chat(
        tmp_path,
        "--persona",
        "haruhi",
        stdin="你好\n今天做什么？\n".encode(),
        server_url=server.base_url,
    )
    assert first.returncode == 0, first.stderr
    replies = first.stdout.splitlines()
    assert len(replies) == 2 and all(r.strip() for r in replies)  # one reply per input line

    stored = turns(tmp_path)
    assert [(c, r) for c, r, _ in stored] == [("terminal:default", "assistant")] + [
        ("terminal:default", r) for r in ("user", "assistant", "user", "assistant")
    ]
    assert stored[0][2].startswith("我对普通的人类没有兴趣")  # first_mes opens the conversation
    assert [s[2] for s in stored[1::2]] == [
        "你好",
        "今天做什么？",
    ]

    # A new process, no --persona: the session's persona and history are still there.
    second = chat(tmp_path, stdin="/history 2\n还记得吗？\n".encode(), server_url=server.base_url)
    assert second.returncode == 0, second.stderr
    assert "今天做什么？" in second.stdout
    assert len(turns(tmp_path)) == 7


async def test_next_prompt_contains_the_earlier_turns(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    result = chat(
        tmp_path, "--persona", "atri", stdin="早上好\n".encode(), server_url=server.base_url
    )
    assert result.returncode == 0, result.stderr
    atri = PersonaRegistry(None).load().get("atri")
    async with (
        Memory.open(tmp_path / "rolecast.db") as memory,
        ModelClient(server.base_url) as client,
    ):
        model = await client.model_for("atri")
        prompt = await PromptBuilder(memory, client).build(
            "terminal:default", atri.card, "atri", model=model, max_tokens=12
        )
    contents = [m["content"] for m in prompt.messages]
    assert contents[0] == atri.card.data.system_prompt
    assert contents[1].startswith("夏生先生") and contents[2] == "早上好"
    assert contents[3] == result.stdout.strip()


def test_chat_starts_and_stops_its_own_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {"ROLECAST_SERVE_ARGS": f'["--model", "{tiny_model_dir}"]'}
    result = chat(tmp_path, "--persona", "xin", stdin="嗨\n".encode(), server_url=None, env=env)
    assert result.returncode == 0, result.stderr
    assert "Model server ready" in result.stderr
    assert result.stdout.strip()
    assert (tmp_path / "logs" / "server.log").exists()
    # The child is gone with the chat: its port no longer answers.
    url = re.search(r"model server on (http://[\d.:]+)", result.stderr)
    assert url is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url.group(1)}/health", timeout=2)


def test_unknown_persona_fails_before_starting_anything(tmp_path: Path) -> None:
    result = chat(tmp_path, "--persona", "nagato", stdin=b"hi\n", server_url=None)
    assert result.returncode == 2
    assert "No persona named 'nagato'" in result.stderr and "atri, haruhi, xin" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_broken_card_is_reported_and_others_still_work(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "broken.json").write_text(
        '{"spec": "chara_card_v2", "spec_version": "2.0"}'
    )
    result = chat(
        tmp_path, "--persona", "haruhi", stdin="你好\n".encode(), server_url=server.base_url
    )
    assert result.returncode == 0, result.stderr
    assert "broken.json" in result.stderr and "data: required field is missing" in result.stderr
    broken = chat(tmp_path, "--persona", "broken", stdin=b"hi\n", server_url=server.base_url)
    assert broken.returncode == 2 and "No persona named 'broken'" in broken.stderr


def test_server_down_keeps_the_turn_and_says_so(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    result = chat(
        tmp_path,
        "--persona",
        "haruhi",
        stdin="这句话不能丢\n".encode(),
        server_url=dead,
        env={"ROLECAST_RETRY_ATTEMPTS": "2"},
    )
    assert result.returncode == 1
    assert "is not answering (connection failed; 2 attempts" in result.stderr
    assert "Your message is saved" in result.stderr
    assert "Traceback" not in result.stderr
    assert [t[2] for t in turns(tmp_path) if t[1] == "user"] == ["这句话不能丢"]


def test_over_long_line_is_refused_and_the_chat_goes_on(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    lines = "长" * (CONTEXT * 2) + "\n短句\n"
    result = chat(tmp_path, "--persona", "haruhi", stdin=lines.encode(), server_url=server.base_url)
    assert result.returncode == 1  # one turn failed
    assert "Please shorten it" in result.stderr
    assert len(result.stdout.splitlines()) == 1  # the short line still got its reply
    assert [t[2] for t in turns(tmp_path) if t[1] == "user"] == [
        "短句"
    ]  # the refused one is not kept


def test_non_utf8_input_is_skipped_with_a_message(server: EmbeddedServer, tmp_path: Path) -> None:
    stdin = b"\xff\xfe broken\n" + "好的\n".encode()
    result = chat(tmp_path, "--persona", "haruhi", stdin=stdin, server_url=server.base_url)
    assert result.returncode == 1
    assert "input line 1 is not valid UTF-8" in result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert [t[2] for t in turns(tmp_path) if t[1] == "user"] == ["好的"]


def test_commands_switch_reset_and_retry(server: EmbeddedServer, tmp_path: Path) -> None:
    script = "你好\n/retry\n/persona atri\n早\n/reset\ny\n/persona haruhi\n/history\n/set temperature=9\n/bogus\n"
    result = chat(
        tmp_path, "--persona", "haruhi", stdin=script.encode(), server_url=server.base_url
    )
    assert "Now chatting with ATRI (atri)" in result.stderr
    assert "[y/N]" in result.stderr
    assert (
        "Deleted 6 turns" in result.stderr
    )  # greeting+2 for haruhi (retry replaced), greeting+2 for atri
    assert "temperature: Input should be less than or equal to 2" in result.stderr
    assert "unknown command /bogus" in result.stderr
    assert result.returncode == 0  # command mistakes are not failed turns
    # After the reset only the fresh greetings remain.
    assert [(t[1], t[2][:4]) for t in turns(tmp_path)] == [
        ("assistant", "夏生先生"),
        ("assistant", "我对普通"),
    ]


def test_approve_keeps_the_last_reply_for_training(server: EmbeddedServer, tmp_path: Path) -> None:
    script = "/approve\n你好\n/approve\n/approve\n"
    result = chat(
        tmp_path, "--persona", "haruhi", stdin=script.encode(), server_url=server.base_url
    )
    assert result.returncode == 0, result.stderr
    assert "no reply to approve yet" in result.stderr  # the greeting alone answers nothing
    assert re.search(
        r"Approved for training: this reply and the 2 turns before it\. haruhi now has 1 "
        r"approved dialogues \(`rolecast retrain --persona haruhi` trains on them\)\.",
        result.stderr,
    )
    assert "Already approved. haruhi has 1 approved dialogues." in result.stderr
    with sqlite3.connect(tmp_path / "rolecast.db") as conn:
        rows = list(conn.execute("SELECT persona, source, approved_by, messages FROM dialogues"))
    assert [(r[0], r[1], r[2]) for r in rows] == [("haruhi", "command", "terminal:User")]
    assert [m["role"] for m in json.loads(rows[0][3])] == ["assistant", "user", "assistant"]


@pytest.mark.slow
def test_default_model_in_character(tmp_path: Path) -> None:
    """The README's main job: haruhi on the real default model, embedded server started by chat."""
    result = chat(
        tmp_path,
        "--persona",
        "haruhi",
        stdin="阿虚: 「春日，你在找什么？」\n".encode(),
        server_url=None,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_publish_then_chat_uses_the_new_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The README's flow on a fresh install: `rolecast adapters publish`, then `rolecast chat`
    answers through the new version, with no variable or flag to say where the registry is:
    both resolve it under the same home, the embedded server loads its current versions and
    the client follows the pointer."""
    from tests.adapters import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "trained", seed=7)
    env = {**os.environ, "ROLECAST_HOME": str(tmp_path)}
    published = subprocess.run(
        [
            sys.executable,
            "-m",
            "rolecast",
            "adapters",
            "publish",
            str(adapter),
            "--persona",
            "haruhi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    assert "published haruhi@v1" in published.stdout
    assert "Only the registry files changed" in published.stdout  # no server was running
    assert (tmp_path / "adapters" / "haruhi" / "current.json").is_file()
    serve = {"ROLECAST_SERVE_ARGS": f'["--model", "{tiny_model_dir}"]'}
    result = chat(
        tmp_path, "--persona", "haruhi", stdin="你好\n".encode(), server_url=None, env=serve
    )
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "rolecast.db") as conn:
        models = [
            row[0]
            for row in conn.execute(
                "SELECT model FROM turns WHERE role = 'assistant' AND model IS NOT NULL"
            )
        ]
    assert models == ["haruhi@v1"]
