"""`rolecast-remote` against a runner that answers garbage, dies mid-command or is not a runner
at all: it says so in one line and exits with its "lost the trainer" status (the retrain loop
then fails the step with that line), never with a traceback."""

from __future__ import annotations

import json
import sys

import pytest
from fastapi.testclient import TestClient

from rolecast import remote
from rolecast.runner import build_app
from tests.hostile.misbehaving_server import Answer, MisbehavingServer

ARGS = ["-m", "rolecast", "train", "--json"]


def ndjson(*lines: bytes, **kw: object) -> Answer:
    return Answer(content_type="application/x-ndjson", parts=list(lines), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (ndjson(b'{"out": "step 1\\n"}\n', b"<html>502 Bad Gateway</html>\n"), "not a runner"),
        (ndjson(b'{"out": "step 1\\n"}\n', b"[1, 2]\n"), "not a runner"),
        (ndjson(b'{"exit": "zero"}\n'), "not a runner"),
        (ndjson(b'{"exit": null}\n'), "not a runner"),
        (ndjson(b'{"exit": 1e400}\n'), "not a runner"),
        (ndjson(b"\xff\xfe\n"), "not a runner"),
        (ndjson(b"[" * 100_000 + b"\n"), "not a runner"),
        (ndjson(b'{"out": "step 1\\n"}\n', complete=False), "lost the trainer"),
        (ndjson(b'{"out": "step 1\\n"}\n'), "closed the connection before the command ended"),
    ],
)
def test_a_runner_that_answers_garbage_is_lost_in_one_line(
    answer: Answer,
    said: str,
    misbehaving: MisbehavingServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    misbehaving.reset()
    misbehaving.answer("/run", answer)
    monkeypatch.setenv("ROLECAST_RUNNER_URL", misbehaving.url)
    assert remote.main(ARGS) == remote.LOST
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["http://[::1", "ftp://host/", "http://:x"])
def test_a_runner_address_that_is_not_one_is_said(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROLECAST_RUNNER_URL", url)
    assert remote.main(ARGS) == 2
    err = capsys.readouterr().err
    assert "ROLECAST_RUNNER_URL" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("python", "args", "said"),
    [
        ("/no/such/python", ["data", "--help"], "/no/such/python"),
        (sys.executable, ["data", "a\x00b"], "null"),
    ],
)
def test_a_command_the_runner_cannot_start_ends_with_its_reason(
    python: str, args: list[str], said: str
) -> None:
    client = TestClient(build_app(python=python), raise_server_exceptions=False)
    response = client.post("/run", json={"args": args})
    events = [json.loads(line) for line in response.text.splitlines()]
    assert events[-1] == {"exit": 127}
    assert len(events) == 2 and "cannot start" in events[0]["out"] and said in events[0]["out"]
