"""The bot's client for the model server: vLLM's OpenAI-compatible HTTP API.

Chat completions go through the openai SDK's `AsyncOpenAI`; vLLM's own endpoints at the server
root (`/tokenize`, `/health`) through the same `httpx.AsyncClient`. Connection errors, 429 and
5xx are retried with exponential backoff (tenacity), bounded in attempts; after that the caller
gets a `ModelServerError` that says what to do. A stream is only retried before its first
token: once text reached the user, a retry would repeat it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI, AsyncStream
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from bot.errors import ModelServerError
from bot.settings import BotSettings, SamplingSettings
from formats.basemodel import SHIPPED_NAME, shipped_personas
from formats.registry import AdapterRegistry, parse_served_name

log = logging.getLogger(__name__)

Message = dict[str, str]
MODELS_TTL_S = 5.0
POINTER_REFRESH_S = 1.0  # a registry pointer to a name not listed re-reads the list this often


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

    @property
    def tokens_per_s(self) -> float | None:
        if not self.completion_tokens or self.ttft_s is None or self.total_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.ttft_s)


class _Retryable(Exception):
    """An HTTP status from a root endpoint that is worth retrying (429, 5xx)."""


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(
        exc,
        openai.APIConnectionError  # includes APITimeoutError
        | openai.RateLimitError
        | openai.InternalServerError
        | httpx.TransportError
        | _Retryable,
    ) or (isinstance(exc, openai.APIStatusError) and exc.status_code >= 500)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_error_message(exc.body) or exc.message}"
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return "connection failed"
    return str(exc) or type(exc).__name__


def _error_message(body: object) -> str | None:
    """The message of a vLLM-shaped error body (`{"error": {"message": ...}}` or flat)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
    return None


class ModelClient:
    """One per process, opened and closed by the entry point (`async with ModelClient(...)`)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "EMPTY",
        timeout_s: float = 120.0,
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
        timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._http = httpx.AsyncClient(
            timeout=timeout, headers={"Authorization": f"Bearer {api_key}"}
        )
        # The SDK keeps its own HTTP client (openai 3 is built on httpx2, not httpx); retries
        # are tenacity's, so the SDK makes none of its own.
        self._openai = AsyncOpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )
        self._models: list[ServedModel] = []
        self._models_at = 0.0

    @classmethod
    def from_settings(cls, settings: BotSettings, base_url: str) -> ModelClient:
        return cls(
            base_url,
            api_key=settings.api_key.get_secret_value(),
            timeout_s=settings.request_timeout_s,
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
        await self._openai.close()
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

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
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
        except openai.APIStatusError as exc:
            raise ModelServerError(f"The model server refused {what}: {_describe(exc)}") from exc
        raise AssertionError("unreachable")

    # -- root endpoints -------------------------------------------------------------------

    async def _post_root(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._http.post(f"{self.root_url}{path}", json=body)
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            message = _error_message(_json_or_none(response)) or response.text[:200]
            raise ModelServerError(
                f"The model server refused {path}: HTTP {response.status_code}: {message}"
            )
        result: dict[str, Any] = response.json()
        return result

    async def health(self) -> bool:
        try:
            response = await self._http.get(f"{self.root_url}/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def tokenize(
        self, model: str, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> TokenCount:
        """Count the tokens of `messages` rendered by the server's chat template."""
        body = {
            "model": model,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
        }
        data = await self._call("/tokenize", self._post_root, "/tokenize", body)
        return TokenCount(count=int(data["count"]), max_model_len=int(data["max_model_len"]))

    # -- models ---------------------------------------------------------------------------

    async def models(self, *, refresh: bool = False) -> list[ServedModel]:
        """The served models (base first), cached for a few seconds."""
        if refresh or not self._models or time.monotonic() - self._models_at > MODELS_TTL_S:
            page = await self._call("the model list", self._openai.models.list)
            self._models = [
                ServedModel(m.id, getattr(m, "root", None), getattr(m, "parent", None))
                for m in page.data
            ]
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

    async def stream_chat(
        self, model: str, messages: Sequence[Message], sampling: SamplingSettings
    ) -> AsyncIterator[str | Completion]:
        """Yield text deltas as they arrive, then one `Completion`."""
        started = time.monotonic()
        body: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "repetition_penalty": sampling.repetition_penalty,  # vLLM's extra sampling field
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = sampling.stop
        # `chat.completions.create` runs the SDK's typed transform over every message of the
        # body, which costs ~0.3 ms per message on a 2-core machine (70 ms for a 227-turn
        # prompt): more than everything else the bot does per message. The body here is
        # already plain JSON, so it goes through the SDK's generic `post`, which keeps its
        # error mapping, SSE parsing and stream closing.
        stream = await self._call(
            "the chat request",
            self._openai.post,
            "/chat/completions",
            body=body,
            # Chunks stay plain JSON objects: building a pydantic model per chunk costs ~100 us,
            # and vLLM sends one chunk per token.
            cast_to=object,
            stream=True,
            stream_cls=AsyncStream[object],
        )
        parts: list[str] = []
        ttft: float | None = None
        finish: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async for chunk in stream:
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if ttft is None:
                            ttft = time.monotonic() - started
                        parts.append(text)
                        yield text
        except (openai.APIError, httpx.HTTPError) as exc:
            raise ModelServerError(
                f"The model server stopped in the middle of a reply ({_describe(exc)}). "
                "Your message is saved: send /retry to ask again."
            ) from exc
        finally:
            await stream.close()
        yield Completion(
            text="".join(parts),
            model=model,
            finish_reason=finish,
            prompt_tokens=usage.get("prompt_tokens") if usage else None,
            completion_tokens=usage.get("completion_tokens") if usage else None,
            ttft_s=ttft,
            total_s=time.monotonic() - started,
        )


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None
