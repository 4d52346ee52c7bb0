"""Start the embedded model server as a child process on a free loopback port.

`rolecast chat` uses this when no server URL is configured, and the tests use it to talk to a
real server over real HTTP. The child is `python -m rolecast serve ...`; this module never
imports the serving package, so the bot process stays free of torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from bot.errors import ModelServerError
from bot.settings import BotSettings

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """`rolecast serve` in a child process, waited on through `/health`.

    Use as a context manager (sync or async); the child is stopped on exit, also on errors.
    The child's output goes to `log_path` so that a failed start can show its last lines.
    """

    def __init__(
        self,
        serve_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 600.0,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.serve_args = list(serve_args)
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def url(self) -> str:
        """Root URL of the server (no `/v1`)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (`.../v1`)."""
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "rolecast",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.serve_args,
        ]

    def start(self) -> None:
        """Spawn the child and block until `/health` answers 200, or raise ModelServerError."""
        cmd = self.command()
        log.info("starting embedded model server: %s", " ".join(cmd))
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("wb")
            self._log_file = out
        env = {**os.environ, **(self.env or {})}
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out if self.log_path else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    self.stop()
                    raise ModelServerError(
                        f"the embedded model server exited with code {code} while starting"
                        + self._log_tail()
                    )
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        log.info("embedded model server ready at %s", self.url)
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        self.stop()
        raise ModelServerError(
            f"the embedded model server did not become healthy within {self.startup_timeout:.0f} s"
            + self._log_tail()
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after `timeout`)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def _log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- server log (last lines) ---\n" + "\n".join(tail)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def embedded_server(settings: BotSettings) -> EmbeddedServer:
    """The embedded server the entry points start when no server URL is configured. It loads
    the adapter registry's current versions, so personas speak through their published
    adapters, as retrains publish them."""
    serve_args = [*settings.serve_args]
    if "--adapters-dir" not in serve_args:
        serve_args += ["--adapters-dir", str(settings.adapters)]
    return EmbeddedServer(
        serve_args,
        startup_timeout=settings.server_startup_timeout_s,
        log_path=settings.logs / "server.log",
        # the same directories as the bot, however the bot got them (flag, TOML, environment)
        env={"ROLECAST_HOME": str(settings.home), "ROLECAST_CACHE_DIR": str(settings.cache_dir)},
    )
