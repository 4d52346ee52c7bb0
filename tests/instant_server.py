"""An instant OpenAI-compatible model server: the HTTP API of vLLM with no model behind it.

Tests and the latency benchmark use it where the point is the bot, not the model: it serves
`/health`, `/v1/models`, `/tokenize` (a deterministic word count, so budgets are predictable)
and `/v1/chat/completions` (SSE streaming in vLLM's chunk shape, usage included, or one JSON
body), answers at once or with a configured per-token delay, and can be told to fail with an
HTTP status. It records every chat request so tests can read the prompts the bot sent.

Run it in a thread of the current process (`InstantServer(...).start()`), or as its own
process: `python -m tests.instant_server --port 8000`. Needs starlette and uvicorn (the `serve`
extra); the bot itself never imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Replier = Callable[[dict[str, Any]], str]
Counter = Callable[[list[dict[str, Any]], bool], int]
MESSAGE_OVERHEAD = 4  # tokens a chat template adds around each message
GENERATION_PROMPT = 3


def count_tokens(messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> int:
    """One token per whitespace-separated word, plus a fixed wrapping per message."""
    total = sum(MESSAGE_OVERHEAD + len(str(m.get("content") or "").split()) for m in messages)
    return total + (GENERATION_PROMPT if add_generation_prompt else 0)


def echo_reply(body: dict[str, Any]) -> str:
    """The default reply: names the model and quotes the start of the last user message."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    last = str(users[-1]["content"]) if users else ""
    return f"[{body.get('model')}] you said: {' '.join(last.split()[:12])}"


@dataclass
class ServerState:
    """What the server does; tests change these fields while it runs."""

    base_model: str = "instant-base"
    adapters: list[str] = field(default_factory=list)  # served LoRA names, e.g. "haruhi@v1"
    max_model_len: int = 2048
    max_model_lens: dict[str, int] = field(default_factory=dict)  # per served model, if other
    reply: Replier = echo_reply
    token_delay_s: float = 0.0
    fail_status: int | None = None  # answer chat requests with this HTTP status
    # (messages, add_generation_prompt) -> tokens; e.g. a real tokenizer's chat template
    counter: Counter = field(
        default=lambda messages, gen: count_tokens(messages, add_generation_prompt=gen)
    )
    # reply text -> the completion tokens usage reports (default: one per streamed word); with
    # a real tokenizer, its count of the text plus the end-of-turn token, as vLLM reports it
    completion_counter: Callable[[str], int] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    peers: list[tuple[str, int] | None] = field(default_factory=list)  # each chat's client end
    tokenize_calls: int = 0
    _failures: list[int] = field(default_factory=list)

    def fail_next(self, *statuses: int) -> None:
        """The next len(statuses) tokenize or chat requests answer with these statuses."""
        self._failures.extend(statuses)

    def injected_failure(self) -> JSONResponse | None:
        if not self._failures:
            return None
        status = self._failures.pop(0)
        return _error(status, f"injected {status}")


def _error(status: int, message: str) -> JSONResponse:
    kind = "BadRequestError" if status < 500 else "InternalServerError"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


def build_app(state: ServerState) -> Starlette:
    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> JSONResponse:
        base = state.base_model
        data = [{"id": base, "object": "model", "owned_by": "rolecast", "root": base}]
        data += [
            {"id": name, "object": "model", "owned_by": "rolecast", "root": name, "parent": base}
            for name in state.adapters
        ]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(request: Request) -> JSONResponse:
        if (failure := state.injected_failure()) is not None:
            return failure
        body = await request.json()
        state.tokenize_calls += 1
        if "messages" in body:
            count = state.counter(body["messages"], bool(body.get("add_generation_prompt")))
        else:
            count = len(str(body.get("prompt", "")).split())
        context = state.max_model_lens.get(str(body.get("model")), state.max_model_len)
        return JSONResponse(
            {"count": count, "max_model_len": context, "tokens": list(range(count))}
        )

    async def chat(request: Request) -> Response:
        if (failure := state.injected_failure()) is not None:
            return failure
        body = await request.json()
        state.requests.append(body)
        state.peers.append((request.client.host, request.client.port) if request.client else None)
        if state.fail_status is not None:
            return _error(state.fail_status, "the instant server was told to fail")
        model = body.get("model")
        if model != state.base_model and model not in state.adapters:
            return _error(404, f"The model `{model}` does not exist.")
        text = state.reply(body)
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        prompt_tokens = state.counter(body.get("messages", []), True)
        completion_tokens = (
            len(pieces) if state.completion_counter is None else state.completion_counter(text)
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None, with_usage: bool = False) -> str:
            payload: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": []
                if with_usage
                else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if with_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for piece in pieces:
                if state.token_delay_s:
                    await asyncio.sleep(state.token_delay_s)
                yield chunk({"content": piece}, None)
            yield chunk({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk({}, None, with_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


class InstantServer:
    """The instant server on a loopback port, in a background thread of this process."""

    def __init__(
        self, state: ServerState | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        from bot.core.sidecar import free_port

        self.state = state or ServerState()
        self.host = host
        self.port = port or free_port(host)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 10.0) -> InstantServer:
        config = uvicorn.Config(
            build_app(self.state),
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, name="instant-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the instant server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=10)

    def __enter__(self) -> InstantServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    state = ServerState(max_model_len=args.max_model_len)
    uvicorn.run(
        build_app(state), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
