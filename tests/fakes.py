"""A fake model server that speaks vLLM's OpenAI-compatible API over real HTTP on loopback.

It answers instantly with a canned reply, so tests of the bot (and its benchmark) measure the
bot, not a model. `/tokenize` counts with a real tokenizer's chat template when one is given
(otherwise 1 token per character plus 4 per message). Every chat request is recorded, and
`fail_next` makes the next requests answer with an error status, for retry tests.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class FakeModelServer:
    def __init__(
        self,
        *,
        reply: str = "我可是SOS团团长！",
        tokenizer: Any = None,
        max_model_len: int = 2048,
        base_model: str = "fake-base",
        adapters: tuple[str, ...] = (),
    ) -> None:
        self.reply = reply
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.base_model = base_model
        self.adapters = list(adapters)
        self.requests: list[dict[str, Any]] = []
        self.tokenize_calls = 0
        self._failures: list[int] = []
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/health", self._health),
                Route("/v1/models", self._models),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, *statuses: int) -> None:
        """The next len(statuses) requests answer with these HTTP statuses."""
        self._failures.extend(statuses)

    def __enter__(self) -> FakeModelServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake model server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _injected_failure(self) -> Response | None:
        if not self._failures:
            return None
        status = self._failures.pop(0)
        body = {"error": {"message": f"injected {status}", "type": "InjectedError", "code": status}}
        return JSONResponse(body, status_code=status)

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def _models(self, request: Request) -> Response:
        data = [
            {
                "id": self.base_model,
                "object": "model",
                "owned_by": "rolecast",
                "root": self.base_model,
                "parent": None,
            }
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "owned_by": "rolecast",
                "root": f"/adapters/{name}",
                "parent": self.base_model,
            }
            for name in self.adapters
        ]
        return JSONResponse({"object": "list", "data": data})

    def count(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> int:
        if self.tokenizer is not None:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True
            )
            return len(ids if isinstance(ids, list) else ids["input_ids"])
        return sum(len(m["content"]) + 4 for m in messages) + (3 if add_generation_prompt else 0)

    async def _tokenize(self, request: Request) -> Response:
        if (failure := self._injected_failure()) is not None:
            return failure
        self.tokenize_calls += 1
        body = await request.json()
        count = self.count(body["messages"], body.get("add_generation_prompt", False))
        return JSONResponse({"count": count, "max_model_len": self.max_model_len, "tokens": []})

    async def _chat(self, request: Request) -> Response:
        if (failure := self._injected_failure()) is not None:
            return failure
        body = await request.json()
        self.requests.append(body)
        created = int(time.time())
        usage = {
            "prompt_tokens": self.count(body["messages"], True),
            "completion_tokens": len(self.reply),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            message = {"role": "assistant", "content": self.reply}
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            obj = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": body["model"],
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            for i in range(0, len(self.reply), 3):
                yield chunk({"content": self.reply[i : i + 3]})
            yield chunk({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                obj = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(obj)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
