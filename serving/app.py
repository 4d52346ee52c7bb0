"""The FastAPI app: routes, error handlers, and one `lifespan` that loads the model, starts the
engine, loads the adapter registry's current versions, records where it serves (so that
`rolecast adapters` finds it, `serving.discovery`), and undoes all of that again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from formats.paths import RolecastPaths
from serving import discovery
from serving.engine import Engine
from serving.errors import ServingError
from serving.metrics import EngineMetrics
from serving.models import LoadedModel, load_model, set_cpu_threads
from serving.protocol import (
    ChatCompletionRequest,
    ErrorInfo,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    UnloadLoRAAdapterRequest,
)
from serving.serving import (
    ServingChat,
    ServingModels,
    ServingTokenization,
    error_response,
    off_loop,
)
from serving.settings import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ServerState:
    """Everything the handlers share, created and closed by the lifespan."""

    loaded: LoadedModel
    engine: Engine
    metrics: EngineMetrics
    models: ServingModels
    chat: ServingChat
    tokenization: ServingTokenization


def _state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


def _error(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def build_app(settings: ServeSettings, paths: RolecastPaths) -> FastAPI:
    """The server for `settings`, loading the registry at `paths.adapters`; nothing is loaded
    until the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_cpu_threads(settings.cpu_threads)
        loaded = await asyncio.to_thread(
            load_model,
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            cache_dir=paths.cache_dir,
        )
        base_name = settings.resolved_served_name()
        metrics = EngineMetrics(base_name)
        engine = Engine(
            loaded,
            max_num_seqs=settings.max_num_seqs,
            max_waiting=settings.max_waiting,
            max_lora_rank=settings.max_lora_rank,
            metrics=metrics,
        )
        engine.start()
        record = None
        try:
            models = ServingModels(engine, base_name, loaded.path)
            chat = ServingChat(engine, models, loaded)
            app.state.server = ServerState(
                loaded=loaded,
                engine=engine,
                metrics=metrics,
                models=models,
                chat=chat,
                tokenization=ServingTokenization(chat, models),
            )
            for name, path in startup_adapters(settings, paths.adapters).items():
                try:
                    await engine.load_adapter(name, path)
                except ServingError as exc:
                    # one bad adapter must not keep the base and the other personas offline
                    log.error("not serving adapter %s: %s", name, exc.message)
            log.info("serving %s (%d adapters)", base_name, len(engine.adapters()))
            if settings.port:
                url = discovery.client_url(settings.host, settings.port)
                record = discovery.record(paths.run_dir, url, paths.adapters, base_name)
            yield
        finally:
            if record is not None:
                record.unlink(missing_ok=True)
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="Rolecast model server", lifespan=lifespan)

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(error_response(exc).model_dump(), status_code=int(exc.status))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            messages.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(HTTPStatus.BAD_REQUEST, "; ".join(messages), "BadRequestError")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase.replace(" ", "")
        return _error(exc.status_code, str(exc.detail), f"{phrase}Error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(
            HTTPStatus.INTERNAL_SERVER_ERROR, "Internal server error.", "InternalServerError"
        )

    @app.get("/health")
    async def health(request: Request) -> Response:
        server = getattr(request.app.state, "server", None)
        if server is None or not server.engine.is_alive():
            return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE)
        return Response(status_code=HTTPStatus.OK)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse(_state(request).models.list_models().model_dump())

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        chat = _state(request).chat
        if body.stream:
            stream = await chat.stream(body)
            return StreamingResponse(stream, media_type="text/event-stream")
        response = await _cancel_on_disconnect(request, chat.complete(body))
        return JSONResponse(response.model_dump())

    @app.post("/tokenize")
    async def tokenize(
        body: TokenizeChatRequest | TokenizeCompletionRequest, request: Request
    ) -> JSONResponse:
        tokenization = _state(request).tokenization
        result = await off_loop(lambda: tokenization.tokenize(body))
        return JSONResponse(result.model_dump(exclude_none=True))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
        message = await _state(request).models.load_lora_adapter(body)
        return PlainTextResponse(message)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
        message = await _state(request).models.unload_lora_adapter(body)
        return PlainTextResponse(message)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        data = generate_latest(_state(request).metrics.registry)
        return Response(content=data, media_type=CONTENT_TYPE_LATEST)

    return app


async def _cancel_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (as vLLM's
    `with_cancellation`): a non-streaming request then stops generating too."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def startup_adapters(settings: ServeSettings, registry_root: Path) -> dict[str, str]:
    """Adapters to load at start: `--lora-modules` and the shipped adapter, then the registry's
    current versions."""
    from formats.errors import FormatError
    from formats.registry import AdapterRegistry

    adapters = settings.startup_modules()
    registry = AdapterRegistry(registry_root)
    for persona in registry.personas():
        try:
            version = registry.current(persona)
        except FormatError as exc:
            log.error("not serving %s: %s", persona, exc)
            continue
        if version is not None:
            adapters.setdefault(version.served_name, str(version.path))
    return adapters
