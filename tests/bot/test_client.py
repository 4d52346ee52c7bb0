"""The model client: retries on connection errors, 429 and 5xx; a clear error when down."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from bot.core.client import Completion, ModelClient
from bot.errors import ModelServerError
from bot.settings import SamplingSettings
from tests.fakes import FakeModelServer


@pytest.fixture
def server() -> Iterator[FakeModelServer]:
    with FakeModelServer(adapters=("haruhi@v1", "haruhi@v3", "haruhi@v2", "atri-x@v9")) as fake:
        yield fake


async def collect(client: ModelClient, model: str) -> tuple[str, Completion]:
    parts, done = [], None
    async for event in client.stream_chat(
        model, [{"role": "user", "content": "hi"}], SamplingSettings(seed=1)
    ):
        if isinstance(event, Completion):
            done = event
        else:
            parts.append(event)
    assert done is not None
    return "".join(parts), done


async def test_streams_text_and_usage(server: FakeModelServer) -> None:
    async with ModelClient(server.base_url) as client:
        text, done = await collect(client, "fake-base")
    assert text == server.reply == done.text
    assert done.finish_reason == "stop"
    assert done.completion_tokens == len(server.reply)
    assert done.ttft_s is not None and done.ttft_s <= done.total_s
    sent = server.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["seed"] == 1 and sent["repetition_penalty"] == 1.1 and sent["max_tokens"] == 200


async def test_newest_adapter_version_wins(server: FakeModelServer) -> None:
    async with ModelClient(server.base_url) as client:
        assert await client.model_for("haruhi") == "haruhi@v3"
        assert await client.model_for("atri") == "fake-base"  # 'atri-x' is another persona


@pytest.mark.parametrize("statuses", [(503,), (429, 500), (502, 503, 504)])
async def test_transient_failures_are_retried(
    server: FakeModelServer, statuses: tuple[int, ...]
) -> None:
    server.fail_next(*statuses)
    async with ModelClient(server.base_url, max_attempts=4, max_backoff_s=0.05) as client:
        text, _ = await collect(client, "fake-base")
    assert text == server.reply


async def test_gives_up_with_a_clear_message(server: FakeModelServer) -> None:
    server.fail_next(503, 503, 503)
    async with ModelClient(server.base_url, max_attempts=3, max_backoff_s=0.05) as client:
        with pytest.raises(
            ModelServerError, match=r"not answering \(HTTP 503: injected 503; 3 attempts"
        ):
            await collect(client, "fake-base")


async def test_client_errors_are_not_retried(server: FakeModelServer) -> None:
    server.fail_next(400)
    async with ModelClient(server.base_url, max_attempts=4, max_backoff_s=0.05) as client:
        with pytest.raises(ModelServerError, match="refused the chat request: HTTP 400"):
            await collect(client, "fake-base")
        text, _ = await collect(client, "fake-base")  # the next one is fine
    assert text == server.reply


async def test_server_down() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    async with ModelClient(
        f"http://127.0.0.1:{port}", max_attempts=2, max_backoff_s=0.05
    ) as client:
        with pytest.raises(
            ModelServerError, match=r"not answering \(connection failed; 2 attempts"
        ):
            await client.tokenize("m", [{"role": "user", "content": "x"}])
        assert not await client.health()
