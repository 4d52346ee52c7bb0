"""The bot's client for the model server: vLLM's OpenAI-compatible HTTP API.

One `httpx.AsyncClient` speaks to every endpoint: `/v1/chat/completions` (streamed), `/v1/models`
and vLLM's own endpoints at the server root (`/tokenize`, `/health`). Connection errors, 429 and
5xx are retried with exponential backoff (tenacity), bounded in attempts; after that the caller
gets a `ModelServerError` that says what to do. A stream is only retried before its first
token: once text reached the user, a retry would repeat it.

Every answer is read defensively (`bot.core.answers`): an answer the bot cannot read becomes a
`ModelAnswerError`, never another exception, and a reply whose stream broke, ended without
`[DONE]` or was cut at the token limit is reported as not complete (`Completion.complete`).
Bodies are read up to a bound, and a streamed reply may take at most `reply_timeout_s` in all
and `max_reply_chars` characters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from bot.core.answers import (
    MAX_BODY_BYTES,
    ChatStream,
    MalformedAnswer,
    SSEDecoder,
    error_message,
    parse_json,
    read_models,
    read_token_count,
    snippet,
)
from bot.core.text import clean_text, defuse_control_tokens
from bot.errors import ModelAnswerError, ModelServerError
from bot.settings import BotSettings, SamplingSettings
from formats.basemodel import SHIPPED_NAME, shipped_personas
from formats.registry import AdapterRegistry, parse_served_name

log = logging.getLogger(__name__)

Message = dict[str, str]
MODELS_TTL_S = 5.0
POINTER_REFRESH_S = 1.0  # a registry pointer to a name not listed re-reads the list this often
ERROR_BODY_BYTES = 64 * 1024  # read of an error answer, for its message
# A reply longer than this many characters per requested token is not a reply (a token is at
# most a few dozen characters); the stream is cut there.
CHARS_PER_TOKEN_LIMIT = 32
# what a stream may still send after [DONE] and keep its connection for the next message
_AFTER_DONE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ServedModel:
    id: str
    root: str | None
    parent: str | None


@dataclass(frozen=True)
class TokenCount:
    count: int
    max_model_len: int


@dataclass(frozen=True)
class Completion:
    """What a finished stream reports after its last text delta."""

    text: str
    model: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_s: float | None
    total_s: float
    # The server said `stop` and ended the stream with [DONE]. A reply cut at the token limit,
    # or whose stream broke or ended without [DONE], is not complete; `problem` says why.
    complete: bool = True
    problem: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if not self.completion_tokens or self.ttft_s is None or self.total_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)


def ending_note(finish_reason: str | None, complete: bool) -> str | None:
    """How a reply that did not finish is marked where it is shown; None when it finished."""
    if complete:
        return None
    return "cut at the token limit" if finish_reason == "length" else "reply interrupted"


def defused(messages: Sequence[Message]) -> list[Message]:
    """`messages` with control-token look-alikes in their text broken up (see
    `bot.core.text.defuse_control_tokens`) and unencodable characters repaired: what every
    request to the server carries."""
    return [{**m, "content": defuse_control_tokens(clean_text(m["content"]))} for m in messages]


class _Retryable(Exception):
    """An HTTP status worth retrying (429, 5xx)."""


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | _Retryable)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.TransportError):
        return "connection failed"
    return str(exc) or type(exc).__name__


async def _finish_body(chunks: AsyncIterator[bytes], deadline: float) -> None:
    """Read what follows `[DONE]` (in practice only the end of the chunked body), so that the
    connection goes back to the pool: a response closed before its end closes its connection,
    and the next message would pay for a new one. Bounded in bytes and time; a server that
    keeps sending after `[DONE]` just loses its connection."""
    read = 0
    try:
        async with asyncio.timeout_at(min(deadline, asyncio.get_running_loop().time() + 0.5)):
            async for raw in chunks:
                read += len(raw)
                if read > _AFTER_DONE_LIMIT:
                    return
    except (TimeoutError, httpx.HTTPError):
        return


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body, or its first `limit` + 1 bytes (the caller treats that as too large)."""
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


async def _check_status(response: httpx.Response, what: str) -> None:
    """Raise for an HTTP error status: _Retryable for 429/5xx, ModelServerError for others."""
    status = response.status_code
    if status < 400:
        return
    body = await _read_capped(response, ERROR_BODY_BYTES)
    try:
        message = error_message(parse_json(body, what))
    except MalformedAnswer:
        message = None
    message = message or snippet(body, 200) or response.reason_phrase
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}: {message}")
    raise ModelServerError(f"The model server refused {what}: HTTP {status}: {message}")


class ModelClient:
    """One per process, opened and closed by the entry point (`async with ModelClient(...)`)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "EMPTY",
        timeout_s: float = 120.0,
        reply_timeout_s: float = 600.0,
        max_attempts: int = 4,
        max_backoff_s: float = 8.0,
        adapters_dir: Path | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.adapters_dir = adapters_dir
        self.registry = AdapterRegistry(adapters_dir) if adapters_dir is not None else None
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.root_url = self.base_url.removesuffix("/v1")
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self.reply_timeout_s = reply_timeout_s
        # `timeout_s` bounds each wait (connecting aside): the first byte, and every gap
        # between the bytes of a stream; `reply_timeout_s` bounds a whole streamed reply.
        timeout = httpx.Timeout(timeout_s, connect=5.0)
        # Bodies are read as sent (`aiter_raw`) and asked for uncompressed: a compressed body
        # could inflate past every bound on what is read, so one is simply unreadable.
        # No cap on connections: the server schedules concurrent replies (vLLM) or sheds load
        # with 429s, which are retried (the embedded server). httpx's default pool of 100 made
        # the 101st concurrent reply wait for a free connection and fail as "not answering",
        # and health checks and token counts queued behind long streams. Idle connections are
        # kept for a busy bot's next replies, within a bound.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self._http = httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            headers={"Authorization": f"Bearer {api_key}", "Accept-Encoding": "identity"},
        )
        self._models: list[ServedModel] = []
        self._models_at = 0.0

    @classmethod
    def from_settings(cls, settings: BotSettings, base_url: str) -> ModelClient:
        return cls(
            base_url,
            api_key=settings.api_key.get_secret_value(),
            timeout_s=settings.request_timeout_s,
            reply_timeout_s=settings.reply_timeout_s,
            max_attempts=settings.retry_attempts,
            max_backoff_s=settings.retry_max_wait_s,
            adapters_dir=settings.adapters,
        )

    async def __aenter__(self) -> ModelClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential_jitter(multiplier=0.5, max=self.max_backoff_s, jitter=0.5),
            before_sleep=lambda state: log.warning(
                "model server attempt %d failed (%s); retrying",
                state.attempt_number,
                _describe(exc) if state.outcome and (exc := state.outcome.exception()) else "?",
            ),
            reraise=False,
        )

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` with retries; turn a final failure into a ModelServerError."""
        started = time.monotonic()
        try:
            async for attempt in self._retrying():
                with attempt:
                    return await fn(*args, **kwargs)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            assert last is not None
            raise ModelServerError(
                f"The model server at {self.root_url} is not answering ({_describe(last)}; "
                f"{self.max_attempts} attempts over {time.monotonic() - started:.0f} s). "
                "Your message is saved: send /retry (or write again) when the server is back."
            ) from last
        raise AssertionError("unreachable")

    async def _request(self, method: str, url: str, what: str, body: Any = None) -> bytes:
        """One request's body (bounded), after its status was checked."""
        request = self._http.build_request(method, url, json=body)
        response = await self._http.send(request, stream=True)
        try:
            await _check_status(response, what)
            return await _read_capped(response, MAX_BODY_BYTES)
        finally:
            await response.aclose()

    # -- root endpoints -------------------------------------------------------------------

    async def health(self) -> bool:
        request = self._http.build_request("GET", f"{self.root_url}/health", timeout=5.0)
        try:
            response = await self._http.send(request, stream=True)  # the body is not read
        except httpx.HTTPError:
            return False
        await response.aclose()
        return response.status_code == 200

    async def tokenize(
        self, model: str, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> TokenCount:
        """Count the tokens of `messages` rendered by the server's chat template."""
        body = {
            "model": model,
            "messages": defused(messages),
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
        }
        raw = await self._call(
            self._request, "POST", f"{self.root_url}/tokenize", "/tokenize", body
        )
        try:
            count, max_model_len = read_token_count(raw)
        except MalformedAnswer as exc:
            raise ModelAnswerError(f"The model server's answer could not be read: {exc}.") from None
        return TokenCount(count=count, max_model_len=max_model_len)

    # -- models ---------------------------------------------------------------------------

    async def models(self, *, refresh: bool = False) -> list[ServedModel]:
        """The served models (base first), cached for a few seconds."""
        if refresh or not self._models or time.monotonic() - self._models_at > MODELS_TTL_S:
            raw = await self._call(
                self._request, "GET", f"{self.base_url}/models", "the model list"
            )
            try:
                entries = read_models(raw)
            except MalformedAnswer as exc:
                raise ModelAnswerError(
                    f"The model server's answer could not be read: {exc}."
                ) from None
            self._models = [ServedModel(e.id, e.root, e.parent) for e in entries]
            self._models_at = time.monotonic()
        return self._models

    async def model_for(self, persona: str, *, shipped: bool = False) -> str:
        """The served name for `persona`: the version the adapter registry's `current.json`
        points at when it is loaded (so a rollback takes effect at once, even while the newer
        version is still loaded and draining), else its newest loaded adapter `<persona>@v<N>`,
        else, for a `shipped` persona (one of the cards that ship, which the shipped adapter
        plays), the shipped adapter when the server runs it, else the base model. Publishing
        loads a new version before switching the pointer. A persona the registry has versions
        of but no pointer for was rolled back past its first version: it speaks as it did
        before any was published."""
        models = await self.models()
        fallback = (
            SHIPPED_NAME
            if shipped
            and persona in shipped_personas()
            and any(m.id == SHIPPED_NAME for m in models)
            else None
        )
        if self.registry is not None:
            wanted = self.registry.current_served_name(persona)
            if wanted is not None:
                stale = time.monotonic() - self._models_at > POINTER_REFRESH_S
                if stale and not any(m.id == wanted for m in models):
                    models = await self.models(refresh=True)  # just published or rolled back
                if any(m.id == wanted for m in models):
                    return wanted
            elif self.registry.knows(persona):
                return fallback or self._base_model(models)
        versions = [
            (parsed[1], served.id)
            for served in models
            if (parsed := parse_served_name(served.id)) and parsed[0] == persona
        ]
        if versions:
            return max(versions)[1]
        return fallback or self._base_model(models)

    def _base_model(self, models: list[ServedModel]) -> str:
        bases = [m.id for m in models if m.parent is None] or [m.id for m in models]
        if not bases:
            raise ModelServerError(f"The model server at {self.root_url} serves no model.")
        return bases[0]

    # -- chat -----------------------------------------------------------------------------

    async def _open_stream(self, body: dict[str, Any]) -> httpx.Response:
        request = self._http.build_request("POST", f"{self.base_url}/chat/completions", json=body)
        response = await self._http.send(request, stream=True)
        try:
            await _check_status(response, "the chat request")
        except BaseException:
            await response.aclose()
            raise
        return response

    async def stream_chat(
        self, model: str, messages: Sequence[Message], sampling: SamplingSettings
    ) -> AsyncIterator[str | Completion]:
        """Yield text deltas as they arrive, then one `Completion`.

        Raises ModelServerError when no reply text arrived (ModelAnswerError when the server
        answered with something unreadable); once text has arrived, a stream that breaks ends
        in a Completion that is not complete, with the text so far."""
        started = time.monotonic()
        body: dict[str, Any] = {
            "model": model,
            "messages": defused(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "repetition_penalty": sampling.repetition_penalty,  # vLLM's extra sampling field
            # a reasoning model's analysis (gpt-oss) is never shown: vLLM and the embedded
            # server leave it out of the stream; the answer reader ignores it anyway
            "include_reasoning": False,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = sampling.stop
        response = await self._call(self._open_stream, body)
        max_chars = sampling.max_tokens * CHARS_PER_TOKEN_LIMIT + 1024
        stream = ChatStream()
        decoder = SSEDecoder()
        parts: list[str] = []
        size = 0
        ttft: float | None = None
        problem: str | None = None
        deadline = asyncio.get_running_loop().time() + self.reply_timeout_s
        chunks = response.aiter_raw()
        broken = False  # the connection failed, rather than the answer being unreadable
        try:
            while not stream.done:
                # Each read waits at most until the deadline, so a server that trickles bytes
                # cannot hold the channel forever (the timeout covers the read only: around a
                # yield it would fire in the consumer's code).
                try:
                    async with asyncio.timeout_at(deadline):
                        raw = await anext(chunks)
                except StopAsyncIteration:
                    events = decoder.close()
                    raw = None
                else:
                    events = decoder.feed(raw)
                for event in events:
                    for text in stream.read(event):
                        if ttft is None:
                            ttft = time.monotonic() - started
                        parts.append(text)
                        size += len(text)
                        yield text
                    if size > max_chars:
                        raise MalformedAnswer(
                            f"a reply longer than {max_chars:,} characters for "
                            f"max_tokens={sampling.max_tokens}"
                        )
                if raw is None:
                    break
            if raw is not None:
                await _finish_body(chunks, deadline)
        except MalformedAnswer as exc:
            problem = str(exc)
        except httpx.HTTPError as exc:
            problem, broken = f"the connection broke ({_describe(exc)})", True
        except TimeoutError:
            problem, broken = f"the reply took longer than {self.reply_timeout_s:.0f} s", True
        finally:
            await response.aclose()
        if problem is None and not stream.done:
            problem = "the stream ended without [DONE]"
        text = "".join(parts)
        if problem is not None:
            log.warning("model %s: %s (after %d characters)", model, problem, len(text))
            if not text.strip():
                error = ModelServerError if broken else ModelAnswerError
                what = "stopped answering" if broken else "sent an answer that could not be read"
                raise error(
                    f"The model server {what} ({problem}). "
                    "Your message is saved: send /retry (or write again) to ask again."
                )
        yield Completion(
            text=text,
            model=model,
            finish_reason=stream.finish_reason,
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens,
            ttft_s=ttft,
            total_s=time.monotonic() - started,
            complete=problem is None and stream.complete,
            problem=problem,
        )
