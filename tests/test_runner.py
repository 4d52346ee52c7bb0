"""`rolecast runner` and `rolecast-remote`: a command sent to the runner runs there with its
output and exit status relayed; only allowed `rolecast` commands run, only with the token; and a
command stops when its caller goes away (a resumed training never runs beside the old one)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.core.sidecar import free_port

TOKEN = "s3cret"


def wait_for(url: str, within_s: float, *, up: bool = True) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            answered = httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            answered = False
        if answered == up:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} {'never answered' if up else 'still answers'} in {within_s} s")


@contextlib.contextmanager
def running_runner(log_dir: Path, token: str, *args: str) -> Iterator[str]:
    """`rolecast runner ARGS` on a free port with `token`, until the block ends; its URL."""
    port = free_port()
    log = (log_dir / "runner.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rolecast", "runner", "--port", str(port), *args],
        env={**os.environ, "ROLECAST_RUNNER_TOKEN": token},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_runner(tmp_path_factory.mktemp("runner"), TOKEN, "--allow", "data,serve") as url:
        yield url


def remote(
    url: str, *args: str, token: str = TOKEN, wait: bool = True
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    argv = [sys.executable, "-m", "rolecast.remote", *args]
    env = {**os.environ, "ROLECAST_RUNNER_URL": url, "ROLECAST_RUNNER_TOKEN": token}
    if not wait:
        return subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def dialogues(path: Path, n: int = 10) -> Path:
    rows = [
        {"id": f"d{i}", "conversations": [
            {"from": "human", "value": f"第{i}个问题？"}, {"from": "gpt", "value": f"回答{i}。"},
        ]}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_a_command_runs_on_the_runner_and_its_exit_status_comes_back(
    runner: str, tmp_path: Path
) -> None:
    data = dialogues(tmp_path / "haruhi.jsonl")
    done = remote(
        runner, "-m", "rolecast", "data", "split", str(data), "--output-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "haruhi_train.jsonl").is_file()
    assert (tmp_path / "haruhi_validation.jsonl").is_file()

    missing = [sys.executable, "-m", "rolecast", "data", "check", str(tmp_path / "none.jsonl")]
    here = subprocess.run(missing, capture_output=True, text=True)
    there = remote(runner, *missing[1:])
    assert here.returncode != 0 and there.returncode == here.returncode
    assert "none.jsonl" in there.stdout  # the command's output, relayed


def test_only_allowed_rolecast_commands_with_the_token_run(runner: str) -> None:
    refused = remote(runner, "-m", "rolecast", "chat", "--persona", "haruhi")
    assert refused.returncode == 2 and "`rolecast chat` does not run here" in refused.stderr
    stranger = remote(runner, "-m", "rolecast", "data", "--help", token="guess")
    assert stranger.returncode == 2 and "HTTP 401" in stranger.stderr
    other = remote(runner, "-c", "import os; os.system('id')")
    assert other.returncode == 2 and "it runs rolecast only" in other.stderr


def test_a_command_stops_when_its_caller_goes_away(runner: str, tiny_model_dir: Path) -> None:
    port = free_port()
    serve = ["-m", "rolecast", "serve", "--model", str(tiny_model_dir), "--port", str(port)]
    caller = remote(runner, *serve, wait=False)
    assert isinstance(caller, subprocess.Popen)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 180)  # running on the runner's side
    finally:
        caller.send_signal(signal.SIGKILL)  # the bot's container went away, say
        caller.wait(timeout=10)
    wait_for(f"http://127.0.0.1:{port}/health", 60, up=False)
