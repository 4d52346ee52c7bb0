"""`rolecast serve` and `rolecast adapters`: the model server's commands.

Only typer and pydantic are imported here; torch and the server load inside the commands.
"""

from __future__ import annotations

import logging
from typing import Any

import typer

log = logging.getLogger(__name__)


def _parse_lora_modules(values: list[str]) -> dict[str, str]:
    modules: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(
                f"expected NAME=PATH, got {value!r}", param_hint="--lora-modules"
            )
        modules[name] = path
    return modules


def serve(
    model: str | None = typer.Option(
        None, help="HF model id or local directory [default: SmolLM2-135M-Instruct]"
    ),
    host: str | None = typer.Option(None, help="Address to listen on [default: 127.0.0.1]"),
    port: int | None = typer.Option(None, help="Port to listen on [default: 8000]"),
    served_model_name: str | None = typer.Option(
        None, help="Name clients use for the base model [default: the model id or path]"
    ),
    device: str | None = typer.Option(None, help="auto | cpu | cuda [default: auto]"),
    dtype: str | None = typer.Option(None, help="auto | float32 | bfloat16 [default: auto]"),
    max_model_len: int | None = typer.Option(None, help="Context length in tokens"),
    max_num_seqs: int | None = typer.Option(None, help="Requests per batch [default: 16]"),
    max_waiting: int | None = typer.Option(None, help="Queue before HTTP 429 [default: 64]"),
    max_lora_rank: int | None = typer.Option(None, help="Largest LoRA rank [default: 64]"),
    lora_modules: list[str] = typer.Option(
        [], "--lora-modules", help="NAME=PATH of an adapter to load at start (repeatable)"
    ),
    adapters_dir: str | None = typer.Option(
        None, help="Adapter registry whose current versions are loaded at start"
    ),
    prepare_only: bool = typer.Option(
        False, "--prepare-only", help="Convert/cache the model, then exit without serving"
    ),
) -> None:
    """Serve the OpenAI-compatible API (as vLLM does) with the embedded engine."""
    from pydantic import ValidationError

    from serving.settings import ServeSettings

    given: dict[str, Any] = {
        "model": model,
        "host": host,
        "port": port,
        "served_model_name": served_model_name,
        "device": device,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_waiting": max_waiting,
        "max_lora_rank": max_lora_rank,
        "adapters_dir": adapters_dir,
    }
    if lora_modules:
        given["lora_modules"] = _parse_lora_modules(lora_modules)
    try:
        settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run_server(settings, prepare_only=prepare_only)


def run_server(settings: Any, *, prepare_only: bool = False) -> None:
    from serving.errors import ModelLoadError
    from serving.models import resolve_model_path

    try:
        if prepare_only:
            path = resolve_model_path(settings.model)
            typer.echo(f"model ready: {path}")
            return
        # Resolve (and convert) before uvicorn starts, so a bad model is a clear CLI error.
        resolve_model_path(settings.model)
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    import uvicorn

    from serving.app import build_app

    uvicorn.run(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        timeout_graceful_shutdown=10,
    )


def register(app: typer.Typer) -> None:
    """Add the serving commands to the root app."""
    app.command("serve")(serve)
