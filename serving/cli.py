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
    cpu_threads: int | None = typer.Option(
        None, help="torch threads on a CPU [default: half the logical CPUs]"
    ),
    max_num_seqs: int | None = typer.Option(None, help="Requests per batch [default: 16]"),
    max_waiting: int | None = typer.Option(None, help="Queue before HTTP 429 [default: 64]"),
    max_lora_rank: int | None = typer.Option(None, help="Largest LoRA rank [default: 64]"),
    lora_modules: list[str] = typer.Option(
        [], "--lora-modules", help="NAME=PATH of an adapter to load at start (repeatable)"
    ),
    adapters_dir: str | None = typer.Option(
        None, help="Adapter registry whose current versions are loaded at start"
    ),
    engine: str | None = typer.Option(
        None, help="embedded (this server) | vllm (run `vllm serve`) [default: embedded]"
    ),
    print_command: bool = typer.Option(
        False, "--print-command", help="With --engine vllm: print the command, do not run it"
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
        "cpu_threads": cpu_threads,
        "max_num_seqs": max_num_seqs,
        "max_waiting": max_waiting,
        "max_lora_rank": max_lora_rank,
        "adapters_dir": adapters_dir,
        "engine": engine,
    }
    if lora_modules:
        given["lora_modules"] = _parse_lora_modules(lora_modules)
    try:
        settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if settings.engine == "vllm":
        run_vllm(settings, print_only=print_command)
        return
    if print_command:
        raise typer.BadParameter("--print-command goes with --engine vllm")
    run_server(settings, prepare_only=prepare_only)


def run_vllm(settings: Any, *, print_only: bool) -> None:
    from serving.registry import AdapterRegistry
    from serving.vllm_launcher import build_vllm_command, exec_vllm, format_command, vllm_model_path

    registry = AdapterRegistry(settings.adapters_dir) if settings.adapters_dir else None
    argv, env = build_vllm_command(
        settings, registry, vllm_model_path(settings, prepare=not print_only)
    )
    if print_only:
        typer.echo(format_command(argv, env))
        return
    try:
        exec_vllm(argv, env)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


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


adapters_app = typer.Typer(
    help="Versioned persona adapters: list, publish (hot, no failed request), roll back.",
    no_args_is_help=True,
)

_DIR_HELP = "Adapter registry [default: $ROLECAST_SERVE_ADAPTERS_DIR or <cache>/adapters]"
_SERVER_HELP = "Running model server to hot-load into [default: $ROLECAST_SERVER_URL; none]"


def _registry(adapters_dir: str | None) -> Any:
    from pathlib import Path

    from serving.registry import AdapterRegistry
    from serving.settings import ServeSettings, cache_dir

    configured = adapters_dir or ServeSettings().adapters_dir
    return AdapterRegistry(Path(configured) if configured else cache_dir() / "adapters")


def _publisher(adapters_dir: str | None, server: str | None, base_model: str | None) -> Any:
    import os

    import httpx

    from serving.publish import Publisher, ServerClient
    from serving.settings import ServeSettings

    url = server or os.environ.get("ROLECAST_SERVER_URL")
    client = ServerClient(url, httpx.Client(timeout=30)) if url else None
    return Publisher(
        _registry(adapters_dir),
        client,
        max_rank=ServeSettings().max_lora_rank,
        base_model=base_model,
    )


@adapters_app.command("list")
def adapters_list(
    adapters_dir: str | None = typer.Option(None, help=_DIR_HELP),
) -> None:
    """Every persona's versions, with metrics, and which one is live."""
    registry = _registry(adapters_dir)
    personas = registry.personas()
    if not personas:
        typer.echo(f"no adapters in {registry.root}")
    for persona in personas:
        current = registry.current(persona)
        for v in registry.versions(persona):
            mark = "*" if current and current.version == v.version else " "
            metrics = v.manifest.get("metrics") or {}
            shown = " ".join(f"{k}={val}" for k, val in sorted(metrics.items()))
            created = v.manifest.get("created", "?")
            typer.echo(f"{mark} {v.served_name:<24} rank={v.rank:<4} {created}  {shown}".rstrip())


@adapters_app.command("publish")
def adapters_publish(
    adapter: str = typer.Argument(..., help="PEFT adapter directory (with rolecast.json)"),
    persona: str = typer.Option(..., help="Persona it speaks for"),
    adapters_dir: str | None = typer.Option(None, help=_DIR_HELP),
    server: str | None = typer.Option(None, help=_SERVER_HELP),
    base_model: str | None = typer.Option(
        None, help="Base model it must match [default: the server's, else the current version's]"
    ),
) -> None:
    """Validate, add as the next version, hot-load, switch, drain and unload the old one."""
    from pathlib import Path

    from serving.registry import RegistryError

    publisher = _publisher(adapters_dir, server, base_model)
    try:
        result = publisher.publish(persona, Path(adapter))
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    old = result.old.served_name if result.old else "none"
    typer.echo(f"published {result.new.served_name} (was {old}; unloaded: {result.unloaded})")


@adapters_app.command("rollback")
def adapters_rollback(
    persona: str = typer.Argument(..., help="Persona to return to its previous version"),
    adapters_dir: str | None = typer.Option(None, help=_DIR_HELP),
    server: str | None = typer.Option(None, help=_SERVER_HELP),
) -> None:
    """Return a persona to its previous version, the same safe way as a publish."""
    from serving.registry import RegistryError

    publisher = _publisher(adapters_dir, server, None)
    try:
        result = publisher.rollback(persona)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    old = result.old.served_name if result.old else "none"
    typer.echo(f"{persona} is back on {result.new.served_name} (was {old})")


def register(app: typer.Typer) -> None:
    """Add the serving commands to the root app."""
    app.command("serve")(serve)
    app.add_typer(adapters_app, name="adapters")
