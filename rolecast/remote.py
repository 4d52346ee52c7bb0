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

import httpx

LOST = 255


def _say(message: str) -> None:
    print(f"rolecast-remote: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:2] != ["-m", "rolecast"] or len(args) < 3:
        _say("usage: rolecast-remote -m rolecast COMMAND [ARGS...] (it runs rolecast only)")
        return 2
    url = os.environ.get("ROLECAST_RUNNER_URL")
    if not url:
        _say("ROLECAST_RUNNER_URL is not set: the trainer's `rolecast runner` address")
        return 2
    headers = {}
    if token := os.environ.get("ROLECAST_RUNNER_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    out = sys.stdout.buffer
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as http,
            http.stream(
                "POST", f"{url.rstrip('/')}/run", json={"args": args[2:]}, headers=headers
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
                event = json.loads(line)
                if "out" in event:
                    out.write(str(event["out"]).encode())
                    out.flush()
                elif "exit" in event:
                    code = int(event["exit"])
                    return 128 - code if code < 0 else code  # killed by a signal: 128 + signal
    except httpx.HTTPError as exc:
        _say(f"lost the trainer at {url}: {exc!r}")
        return LOST
    _say(f"the trainer at {url} closed the connection before the command ended")
    return LOST


if __name__ == "__main__":
    sys.exit(main())
