"""The model client: retries on connection errors, 429 and 5xx; a clear error when down."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from bot.core.client import Completion, ModelClient
from bot.errors import ModelServerError
from bot.settings import SamplingSettings
from tests.instant_server import InstantServer, ServerState

REPLY = "我可是SOS团团长！"


@pytest.fixture
def server() -> Iterator[InstantServer]:
    adapters = ["haruhi@v1", "haruhi@v3", "haruhi@v2", "atri-x@v9"]
    state = ServerState(adapters=adapters, reply=lambda body: REPLY)
    with InstantServer(state) as instant:
        yield instant


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


async def test_streams_text_and_usage(server: InstantServer) -> None:
    async with ModelClient(server.base_url) as client:
        text, done = await collect(client, "instant-base")
    assert text == REPLY == done.text
    assert done.finish_reason == "stop"
    assert done.completion_tokens == 1  # the instant server streams words; this is one
    assert done.ttft_s is not None and done.ttft_s <= done.total_s
    sent = server.state.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["seed"] == 1 and sent["repetition_penalty"] == 1.0 and sent["max_tokens"] == 200


async def test_replies_reuse_one_connection(server: InstantServer) -> None:
    """A streamed reply is read to the end of its body, so the next message goes over the same
    connection instead of opening a new one (each one costs a handshake per message)."""
    async with ModelClient(server.base_url) as client:
        for _ in range(4):
            text, done = await collect(client, "instant-base")
            assert text == REPLY and done.complete
    assert len(server.state.peers) == 4
    assert len(set(server.state.peers)) == 1, server.state.peers


async def test_newest_adapter_version_wins(server: InstantServer) -> None:
    async with ModelClient(server.base_url) as client:
        assert await client.model_for("haruhi") == "haruhi@v3"
        assert await client.model_for("atri") == "instant-base"  # 'atri-x' is another persona


async def test_a_shipped_persona_speaks_through_the_shipped_adapter_until_it_has_its_own(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from formats.basemodel import SHIPPED_NAME

    state = ServerState(adapters=[SHIPPED_NAME, "xin@v2"], reply=lambda body: REPLY)
    adapters_dir = tmp_path / "adapters"
    with InstantServer(state) as instant:
        async with ModelClient(instant.base_url, adapters_dir=adapters_dir) as client:
            # a shipped card, nothing published: the shipped adapter
            assert await client.model_for("haruhi", shipped=True) == SHIPPED_NAME
            # an imported card under a key of its own: the shipped adapter does not play it
            assert await client.model_for("haruhi", shipped=False) == "instant-base"
            assert await client.model_for("mycat", shipped=True) == "instant-base"
            # a published version of its own wins over the shipped adapter
            assert await client.model_for("xin", shipped=True) == "xin@v2"
        state.adapters.remove(SHIPPED_NAME)  # a server run with --no-shipped-adapter
        async with ModelClient(instant.base_url, adapters_dir=adapters_dir) as client:
            assert await client.model_for("haruhi", shipped=True) == "instant-base"


@pytest.mark.parametrize("statuses", [(503,), (429, 500), (502, 503, 504)])
async def test_transient_failures_are_retried(
    server: InstantServer, statuses: tuple[int, ...]
) -> None:
    server.state.fail_next(*statuses)
    async with ModelClient(server.base_url, max_attempts=4, max_backoff_s=0.05) as client:
        text, _ = await collect(client, "instant-base")
    assert text == REPLY


async def test_gives_up_with_a_clear_message(server: InstantServer) -> None:
    server.state.fail_next(503, 503, 503)
    async with ModelClient(server.base_url, max_attempts=3, max_backoff_s=0.05) as client:
        with pytest.raises(
            ModelServerError, match=r"not answering \(HTTP 503: injected 503; 3 attempts"
        ):
            await collect(client, "instant-base")


async def test_client_errors_are_not_retried(server: InstantServer) -> None:
    server.state.fail_next(400)
    async with ModelClient(server.base_url, max_attempts=4, max_backoff_s=0.05) as client:
        with pytest.raises(ModelServerError, match="refused the chat request: HTTP 400"):
            await collect(client, "instant-base")
        text, _ = await collect(client, "instant-base")  # the next one is fine
    assert text == REPLY


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


async def test_many_concurrent_replies_do_not_queue_inside_the_client() -> None:
    """A busy bot streams many replies at once (one per channel that is being answered). The
    server schedules them (vLLM) or sheds load with 429s (the embedded server); the client must
    not cap them itself: a capped connection pool made the reply past the cap wait for a free
    connection, then fail as "not answering", and with it the health checks and token counts."""
    words = " ".join(["word"] * 12)
    state = ServerState(reply=lambda body: words, token_delay_s=0.25)  # ~3 s per reply
    with InstantServer(state) as server:
        async with ModelClient(server.base_url, timeout_s=1.0, max_attempts=1) as client:

            async def one() -> str:
                text, done = await collect(client, "instant-base")
                assert done.complete
                return text

            replies = asyncio.gather(*(one() for _ in range(130)))
            await asyncio.sleep(1.0)  # every stream open, none near its end
            assert await client.health()  # the pool has room beside 130 streams
            assert set(await replies) == {words}
