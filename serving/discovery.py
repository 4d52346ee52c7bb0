"""Running model servers, found by `rolecast adapters publish|rollback` when no `--server` is given.

`rolecast serve` records its address in `<home>/run/server-<pid>.json` once it serves (the
registry it loads, its base model, its process id and start time) and removes the file when it
stops. A record is believed only while its process runs (the same pid and start time, through
psutil: a recycled pid is not mistaken for the server) and `/health` answers; a stale record is
removed. `rolecast serve --engine vllm` replaces itself with vLLM and so leaves no record: name
that server with `--server` or `ROLECAST_SERVER_URL`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel, ValidationError

from formats.jsonfile import read_object, write_atomic

log = logging.getLogger(__name__)

PREFIX = "server-"


class ServerRecord(BaseModel):
    pid: int
    started: float  # the process's start time, as psutil reports it
    url: str  # root URL, no /v1
    adapters_dir: str
    base_model: str


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a server listening on `host:port` at."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def record(run_dir: Path, url: str, adapters_dir: Path, base_model: str) -> Path:
    """Record this process as a server serving `url` with `adapters_dir`; returns the file."""
    me = psutil.Process()
    entry = ServerRecord(
        pid=me.pid,
        started=me.create_time(),
        url=url,
        adapters_dir=str(Path(adapters_dir).resolve()),
        base_model=base_model,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{PREFIX}{os.getpid()}.json"
    write_atomic(path, entry.model_dump())
    return path


def _running(entry: ServerRecord) -> bool:
    try:
        process = psutil.Process(entry.pid)
        return (
            abs(process.create_time() - entry.started) < 0.01
            and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def running_servers(run_dir: Path, adapters_dir: Path) -> list[ServerRecord]:
    """The live servers recorded in `run_dir` that load the registry at `adapters_dir`."""
    if not run_dir.is_dir():
        return []
    wanted = str(Path(adapters_dir).resolve())
    found = []
    for path in sorted(run_dir.glob(f"{PREFIX}*.json")):
        try:
            data = read_object(path)
            entry = ServerRecord.model_validate(data or {})
        except (ValueError, UnicodeDecodeError, ValidationError):
            log.warning("ignoring %s: not a server record", path)
            continue
        if not _running(entry):
            log.info("removing the record of a server that stopped: %s", path)
            path.unlink(missing_ok=True)
            continue
        if entry.adapters_dir != wanted:
            continue
        try:
            healthy = httpx.get(f"{entry.url}/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            found.append(entry)
    return found
