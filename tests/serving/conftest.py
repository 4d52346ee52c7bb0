"""A real embedded server per test module, started through the bot's launcher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from bot.core.sidecar import EmbeddedServer


def start_server(tmp_path: Path, serve_args: list[str]) -> EmbeddedServer:
    server = EmbeddedServer(
        serve_args=serve_args, log_path=tmp_path / "server.log", startup_timeout=300
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def tiny_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    """The tiny model behind a real server, with small limits that the error tests reach."""
    server = start_server(
        tmp_path_factory.mktemp("tiny-server"),
        [
            "--model",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
            "--max-waiting",
            "4",
        ],
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def launch() -> Iterator[Callable[[Path, list[str]], EmbeddedServer]]:
    """Start servers inside one test; each is stopped when the test ends."""
    started: list[EmbeddedServer] = []

    def _launch(tmp_path: Path, serve_args: list[str]) -> EmbeddedServer:
        server = start_server(tmp_path, serve_args)
        started.append(server)
        return server

    yield _launch
    for server in started:
        server.stop()


@pytest.fixture
def client(tiny_server: EmbeddedServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0) as c:
        yield c
