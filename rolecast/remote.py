"""`rolecast-remote`: run a `rolecast` command on the trainer, as if it ran here.

It stands in for the Python interpreter of a bot's retrain loop (`retrain.python`), which runs
its steps as `PYTHON -m rolecast ARGS`: `rolecast-remote -m rolecast ARGS` sends ARGS to the
trainer's `rolecast runner` (`ROLECAST_RUNNER_URL`, with `ROLECAST_RUNNER_TOKEN` when set),
prints what the command prints there, and exits with its exit status. Paths in ARGS must mean
the same on both sides (the retrain work directory and the adapter registry are mounted at the
same paths). Stopping this process stops the command on the trainer. Needs only httpx, so it
runs in the bot's image.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import httpx

LOST = 255


def _say(message: str) -> None:
    print(f"rolecast-remote: {message}", file=sys.stderr, flush=True)


def _runner_url(url: str) -> str | None:
    """The runner's base address, None when `url` is not an http(s) address with a host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    return url.rstrip("/")


def _event(line: str) -> dict[str, Any] | None:
    """One NDJSON line of the runner's answer, None when it is not one a runner sends: an
    object with a text `out`, a `beat`, or an `exit` status (0-255, or minus a signal)."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict):
        return None
    if "out" in event:
        return event if isinstance(event["out"], str) else None
    if "exit" in event:
        code = event["exit"]
        valid = isinstance(code, int) and not isinstance(code, bool) and -64 <= code <= 255
        return event if valid else None
    return event if event.get("beat") is True else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:2] != ["-m", "rolecast"] or len(args) < 3:
        _say("usage: rolecast-remote -m rolecast COMMAND [ARGS...] (it runs rolecast only)")
        return 2
    url = os.environ.get("ROLECAST_RUNNER_URL")
    if not url:
        _say("ROLECAST_RUNNER_URL is not set: the trainer's `rolecast runner` address")
        return 2
    if (base := _runner_url(url)) is None:
        _say(f"ROLECAST_RUNNER_URL {url[:200]!r} is not an http(s) address of a `rolecast runner`")
        return 2
    headers = {}
    if token := os.environ.get("ROLECAST_RUNNER_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    out = sys.stdout.buffer
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as http,
            http.stream(
                "POST", f"{base}/run", json={"args": args[2:]}, headers=headers
            ) as response,
        ):
            if response.status_code != 200:
                response.read()
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:500]
                _say(f"{url} refused: HTTP {response.status_code}: {message}")
                return 2
            for line in response.iter_lines():
                if not line:
                    continue
                event = _event(line)
                if event is None:
                    _say(f"{url} is not a runner, or a broken one: it answered {line[:200]!r}")
                    return LOST
                if "out" in event:
                    out.write(event["out"].encode(errors="replace"))
                    out.flush()
                elif "exit" in event:
                    code = event["exit"]
                    return 128 - code if code < 0 else code  # killed by a signal: 128 + signal
    except httpx.HTTPError as exc:
        _say(f"lost the trainer at {url}: {exc!r}")
        return LOST
    _say(f"the trainer at {url} closed the connection before the command ended")
    return LOST


if __name__ == "__main__":
    sys.exit(main())
