"""`rolecast runner`: the training host's side of a retrain loop that runs elsewhere.

A bot's image has no torch, yet its retrain loop runs `python -m rolecast data clean | train |
eval | adapters publish` as child processes. In production those run on the trainer (a host or
container with a GPU, torch, Rolecast's train extra, and the same registry and retrain paths as
the bot): the bot's loop is pointed at `rolecast-remote` (`rolecast.remote`) in place of its
Python interpreter, which sends each command here and relays its output and exit status.

    POST /run  {"args": ["train", "--data", ...]}  ->  200, NDJSON lines:
        {"out": "<a line the command printed>"} ... {"beat": true} ... {"exit": <status>}
    GET /health -> {"status": "ok"}

Only `rolecast` commands run, and only those whose first word is allowed (`data`, `train`,
`eval`, `adapters`); with `ROLECAST_RUNNER_TOKEN` set, a request must bring it as a bearer
token. Training and evaluation take the GPU one at a time. A command lives as long as its
request: when the caller goes away (the bot restarted, the loop was cancelled), the command is
stopped, so a resumed training (`--resume`, from its last checkpoint) never runs beside the one
it replaces. A silent command is checked on every few seconds with a `beat` line, which is how
a caller that went away is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

ALLOWED = ("data", "train", "eval", "adapters")
#: Commands that take the GPU: one at a time.
GPU_COMMANDS = frozenset({"train", "eval"})
BEAT_S = 5.0
STOP_GRACE_S = 10.0
#: The exit status of a command that could not be started (as a shell's).
NOT_STARTED = 127


class RunRequest(BaseModel):
    args: list[str] = Field(min_length=1, description="`rolecast` arguments, command first")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Stop the command's whole process group: SIGTERM, then SIGKILL after a grace period."""
    if proc.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), wait)
            return
        except TimeoutError:
            continue


async def _run(args: list[str], python: str, gpu: asyncio.Lock) -> AsyncIterator[str]:
    """The command's output lines, beats while it is silent, and its exit status, as NDJSON."""
    async with contextlib.AsyncExitStack() as stack:
        if args[0] in GPU_COMMANDS:
            await stack.enter_async_context(gpu)
        try:
            proc = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "rolecast",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        except (OSError, ValueError) as exc:  # no such interpreter, a NUL in an argument...
            why = getattr(exc, "strerror", None) or str(exc)
            log.warning("cannot start rolecast %s: %s", args[0], why)
            message = f"rolecast runner: cannot start `{python} -m rolecast {args[0]}`: {why}\n"
            yield json.dumps({"out": message}, ensure_ascii=False) + "\n"
            yield json.dumps({"exit": NOT_STARTED}) + "\n"
            return
        log.warning("running rolecast %s (pid %d)", " ".join(args), proc.pid)
        stack.push_async_callback(_stop, proc)  # also when the caller has gone away
        assert proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), BEAT_S)
            except TimeoutError:
                yield json.dumps({"beat": True}) + "\n"
                continue
            if not line:
                break
            yield json.dumps({"out": line.decode(errors="replace")}, ensure_ascii=False) + "\n"
        code = await proc.wait()
        log.warning("rolecast %s ended with %d", args[0], code)
        yield json.dumps({"exit": code}) + "\n"


def build_app(
    *,
    token: str | None = None,
    allowed: Sequence[str] = ALLOWED,
    python: str = sys.executable,
) -> FastAPI:
    app = FastAPI(title="Rolecast runner")
    gpu = asyncio.Lock()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/run", response_model=None)
    async def run(
        request: RunRequest, authorization: str | None = Header(None)
    ) -> JSONResponse | StreamingResponse:
        if token and not hmac.compare_digest(authorization or "", f"Bearer {token}"):
            return _error(401, "a valid ROLECAST_RUNNER_TOKEN is needed")
        if request.args[0] not in allowed:
            return _error(
                403,
                f"`rolecast {request.args[0]}` does not run here; allowed: {', '.join(allowed)}",
            )
        return StreamingResponse(_run(request.args, python, gpu), media_type="application/x-ndjson")

    return app
