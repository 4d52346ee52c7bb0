"""A model server that misbehaves on request: the bytes of every answer are the test's to choose.

It speaks HTTP/1.1 itself over asyncio streams (in a background thread), so that an answer can
be anything a broken or hostile server sends: garbage or binary SSE, JSON of the wrong shape,
a stream that ends cleanly without `[DONE]` or is cut mid-reply (chunked body without its
last chunk, or fewer bytes than the declared length), HTML where JSON belongs, HTTP errors,
and answers that trickle or hang. Unless told otherwise it answers like vLLM: `/health`,
`/v1/models`, `/tokenize` (one token per word plus a fixed wrapping) and a streamed chat
completion.

    with MisbehavingServer() as server:
        server.answer("/v1/chat/completions", Answer(parts=[b"data: garbage\\n\\n"]))
        ...

`answer(route, ...)` sets the answer for every later request to the route; `answer_once`
queues answers used once each, before the standing one. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

from bot.core.sidecar import free_port

BASE_MODEL = "fake-base"
MAX_MODEL_LEN = 4096
REPLY = "Hello there, traveller."

Part = bytes | float  # bytes to send, or seconds to pause


@dataclass
class Answer:
    """One HTTP answer, byte for byte."""

    status: int = 200
    content_type: str = "text/event-stream"
    parts: list[Part] = field(default_factory=list)
    # chunked: Transfer-Encoding chunked; length: a Content-Length; close: the body ends when
    # the connection closes (no way for the client to tell a cut from the end)
    framing: Literal["chunked", "length", "close"] = "chunked"
    # False: the connection is dropped before the body's declared end (chunked: no last chunk;
    # length: the declared length is longer than what is sent)
    complete: bool = True
    delay: float = 0.0  # seconds before the status line


Responder = Callable[[dict[str, Any] | None], Answer]


# -- building answers --------------------------------------------------------------------------


def event(data: Any) -> bytes:
    """One SSE event: JSON of `data`, or `data` itself when it is a str."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode("utf-8", "surrogatepass")  # a lone surrogate: bad bytes


def chunk(content: Any = None, finish: Any = None, **extra: Any) -> dict[str, Any]:
    """A chat-completion chunk in vLLM's shape."""
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": BASE_MODEL,
        "choices": [choice],
        **extra,
    }


def usage(prompt: Any = 12, completion: Any = 4) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": BASE_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }


def reply_events(text: str = REPLY, *, finish: str = "stop", done: bool = True) -> list[Part]:
    """The events of a well-formed streamed reply, word by word."""
    words = text.split(" ")
    parts: list[Part] = [event(chunk(""))]
    parts += [event(chunk(w if i == 0 else " " + w)) for i, w in enumerate(words)]
    parts += [event(chunk(finish=finish)), event(usage(12, len(words)))]
    if done:
        parts.append(event("[DONE]"))
    return parts


def json_answer(body: Any, status: int = 200) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Answer(status=status, content_type="application/json", parts=[raw], framing="length")


def html_answer(status: int = 200) -> Answer:
    page = b"<!doctype html><html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
    return Answer(status=status, content_type="text/html", parts=[page], framing="length")


def count_tokens(body: dict[str, Any] | None) -> int:
    messages = (body or {}).get("messages") or []
    words = sum(4 + len(str(m.get("content") or "").split()) for m in messages)
    return words + (3 if (body or {}).get("add_generation_prompt") else 0)


def good_models(_: dict[str, Any] | None = None) -> Answer:
    data = [{"id": BASE_MODEL, "object": "model", "root": BASE_MODEL, "parent": None}]
    return json_answer({"object": "list", "data": data})


def good_tokenize(body: dict[str, Any] | None) -> Answer:
    count = count_tokens(body)
    return json_answer({"count": count, "max_model_len": MAX_MODEL_LEN, "tokens": [1] * count})


def good_chat(_: dict[str, Any] | None = None) -> Answer:
    return Answer(parts=reply_events())


def good_health(_: dict[str, Any] | None = None) -> Answer:
    return Answer(content_type="text/plain", parts=[], framing="length")


DEFAULTS: dict[str, Responder] = {
    "/health": good_health,
    "/v1/models": good_models,
    "/tokenize": good_tokenize,
    "/v1/chat/completions": good_chat,
}


# -- the server --------------------------------------------------------------------------------


class MisbehavingServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, JSON body or None)
        self._standing: dict[str, Answer | Responder] = {}
        self._once: dict[str, list[Answer]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    # -- what to answer -------------------------------------------------------------------------

    def answer(self, route: str, answer: Answer | Responder) -> None:
        with self._lock:
            self._standing[route] = answer

    def answer_once(self, route: str, *answers: Answer) -> None:
        with self._lock:
            self._once.setdefault(route, []).extend(answers)

    def reset(self) -> None:
        with self._lock:
            self._standing.clear()
            self._once.clear()
            self.requests.clear()

    def chat_requests(self) -> list[Any]:
        return [body for _, path, body in self.requests if path == "/v1/chat/completions"]

    def _answer_for(self, path: str, body: Any) -> Answer:
        with self._lock:
            queued = self._once.get(path)
            if queued:
                return queued.pop(0)
            chosen = self._standing.get(path) or DEFAULTS.get(path)
        if chosen is None:
            return json_answer({"error": {"message": f"no route {path}", "code": 404}}, 404)
        return chosen if isinstance(chosen, Answer) else chosen(body)

    # -- HTTP -----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)
            }
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            path = target.split("?", 1)[0]
            self.requests.append((method, path, body))
            await self._write(writer, self._answer_for(path, body))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass  # the client went away: nothing to answer
        finally:
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        if answer.delay:
            await asyncio.sleep(answer.delay)
        try:
            reason = HTTPStatus(answer.status).phrase
        except ValueError:
            reason = "Whatever"
        head = [f"HTTP/1.1 {answer.status} {reason}", f"Content-Type: {answer.content_type}"]
        head.append("Connection: close")
        data = [p for p in answer.parts if isinstance(p, bytes)]
        if answer.framing == "chunked":
            head.append("Transfer-Encoding: chunked")
        elif answer.framing == "length":
            declared = sum(map(len, data)) + (0 if answer.complete else 100)
            head.append(f"Content-Length: {declared}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        for part in answer.parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
                continue
            if not part:
                continue
            if answer.framing == "chunked":
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            else:
                writer.write(part)
            await writer.drain()
        if answer.framing == "chunked" and answer.complete:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    # -- lifetime ---------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> MisbehavingServer:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                def spawn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                    task = loop.create_task(self._handle(r, w))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

                self._server = await asyncio.start_server(spawn, self.host, self.port)
                started.set()

            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="misbehaving-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"the misbehaving server did not start on {self.url}")
        return self

    def stop(self) -> None:
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None:
            return

        def shutdown() -> None:
            if server is not None:
                server.close()
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> MisbehavingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the catalogue: every way of misbehaving the tests drive through the bot --------------------

_TEXT = [event(chunk("Once ")), event(chunk("upon a time"))]  # reply text before things go wrong
CHAT = "/v1/chat/completions"

MISBEHAVIOURS: dict[str, dict[str, Answer]] = {
    # garbage and binary instead of events
    "garbage_sse": {CHAT: Answer(parts=[b"data: {not json at all\n\n", *reply_events()])},
    "binary_sse": {CHAT: Answer(parts=[bytes(range(256)) * 4, b"\n\n"])},
    "not_sse_at_all": {CHAT: Answer(parts=[b"hello, I am not a stream\n"])},
    "garbage_after_text": {CHAT: Answer(parts=[*_TEXT, b"data: \xff\xfe{]]\n\n"])},
    # JSON of the wrong shape
    "choices_is_5": {CHAT: Answer(parts=[event({"choices": 5}), event("[DONE]")])},
    "choice_is_5": {CHAT: Answer(parts=[event({"choices": [5]}), event("[DONE]")])},
    "delta_is_5": {CHAT: Answer(parts=[event({"choices": [{"delta": 5}]}), event("[DONE]")])},
    "content_is_5": {CHAT: Answer(parts=[event(chunk(5)), event("[DONE]")])},
    "event_is_a_list": {CHAT: Answer(parts=[event([1, 2, 3]), event("[DONE]")])},
    "deep_json_event": {CHAT: Answer(parts=[event("[" * 5000 + "]" * 5000), event("[DONE]")])},
    "wrong_typed_usage": {
        CHAT: Answer(
            parts=[
                event(chunk("Fine ")),
                event(chunk("words.", finish="stop")),
                event(usage("twelve", 10**40)),
                event("[DONE]"),
            ]
        )
    },
    "surrogates_in_text": {
        CHAT: Answer(
            parts=[
                b'data: {"choices": [{"delta": {"content": "bad \\ud800 half"}}]}\n\n',
                event(chunk(finish="stop")),
                event("[DONE]"),
            ]
        )
    },
    "error_event": {
        CHAT: Answer(
            parts=[event({"error": {"message": "engine died", "code": 500}}), event("[DONE]")]
        )
    },
    "error_after_text": {
        CHAT: Answer(parts=[*_TEXT, event({"error": {"message": "engine died"}})])
    },
    # streams that do not finish
    "no_done_clean_close": {CHAT: Answer(parts=reply_events(done=False), framing="close")},
    "no_done_chunked": {CHAT: Answer(parts=reply_events(done=False))},
    "cut_mid_reply": {CHAT: Answer(parts=_TEXT, complete=False)},
    "cut_mid_event": {CHAT: Answer(parts=[*_TEXT, b'data: {"choices": [{"del'], complete=False)},
    "short_content_length": {CHAT: Answer(parts=_TEXT, framing="length", complete=False)},
    "cut_at_token_limit": {CHAT: Answer(parts=reply_events(finish="length"))},
    # a whole reply, then more: junk beyond what the client reads after [DONE], or no end
    "junk_after_done": {CHAT: Answer(parts=[*reply_events(), bytes(200_000)])},
    "hang_after_done": {CHAT: Answer(parts=[*reply_events(), 30.0])},
    "empty_stream": {CHAT: Answer(parts=[event("[DONE]")])},
    # /tokenize and /v1/models
    "tokenize_not_json": {
        "/tokenize": Answer(content_type="text/plain", parts=[b"oops"], framing="length")
    },
    "tokenize_html": {"/tokenize": html_answer()},
    "tokenize_count_is_text": {"/tokenize": json_answer({"count": "many", "max_model_len": 4096})},
    "tokenize_count_negative": {"/tokenize": json_answer({"count": -5, "max_model_len": 4096})},
    "tokenize_count_huge": {"/tokenize": json_answer({"count": 10**30, "max_model_len": 4096})},
    "tokenize_list": {"/tokenize": json_answer([1, 2, 3])},
    "tokenize_500": {"/tokenize": json_answer({"error": {"message": "boom"}}, 500)},
    "models_html": {"/v1/models": html_answer()},
    "models_data_is_5": {"/v1/models": json_answer({"data": 5})},
    "models_ids_wrong": {"/v1/models": json_answer({"data": [{"id": 5}, {"id": None}, "x"]})},
    # HTTP errors
    "chat_500": {CHAT: json_answer({"error": {"message": "overloaded"}}, 500)},
    "chat_400": {CHAT: json_answer({"error": {"message": "bad request"}}, 400)},
    "chat_400_huge_html": {CHAT: Answer(400, "text/html", [b"<p>" + b"x" * 300_000], "length")},
    "chat_html_200": {CHAT: html_answer()},
    # slow and hanging answers (the tests' client waits 1 s per read, 3 s per reply)
    "hang_before_headers": {CHAT: Answer(delay=30.0)},
    "hang_after_headers": {CHAT: Answer(parts=[30.0])},
    "trickle_past_deadline": {
        CHAT: Answer(
            parts=[_TEXT[0], *[p for w in range(40) for p in (0.2, event(chunk(f" w{w}")))]]
        )
    },
}
