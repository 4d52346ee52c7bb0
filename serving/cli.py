"""`rolecast serve` and `rolecast adapters`: the model server's commands.

Only typer and pydantic are imported here; torch and the server load inside the commands. The
directories they share with the other packages (home, cache, the adapter registry) resolve in
`formats.paths`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import typer

from formats.paths import RolecastPaths, load, resolve

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
        None, help="HF model id or local directory (default: SmolLM2-135M-Instruct, converted once)"
    ),
    host: str | None = typer.Option(None, help="Address to listen on (default: 127.0.0.1)"),
    port: int | None = typer.Option(None, help="Port to listen on (default: 8000)"),
    served_model_name: str | None = typer.Option(
        None, help="Name clients use for the base model (default: the model id or path)"
    ),
    device: str | None = typer.Option(None, help="auto | cpu | cuda (default: auto)"),
    dtype: str | None = typer.Option(None, help="auto | float32 | bfloat16 (default: auto)"),
    max_model_len: int | None = typer.Option(None, help="Context length in tokens"),
    cpu_threads: int | None = typer.Option(
        None, help="torch threads on a CPU (default: half the logical CPUs)"
    ),
    max_num_seqs: int | None = typer.Option(None, help="Requests per batch (default: 16)"),
    max_waiting: int | None = typer.Option(None, help="Queue before HTTP 429 (default: 64)"),
    max_lora_rank: int | None = typer.Option(
        None, help="Largest LoRA rank loaded or published (default: 256)"
    ),
    gpu_memory_utilization: float | None = typer.Option(
        None, help="vLLM: share of GPU memory to take (default: vLLM's, 0.9)"
    ),
    kv_cache_memory_gb: float | None = typer.Option(
        None,
        help="vLLM: GiB of KV cache, fixed; skips vLLM's start-up memory profiling, which "
        "miscounts when a trainer shares the GPU (default: what profiling leaves)",
    ),
    enforce_eager: bool | None = typer.Option(
        None,
        "--enforce-eager/--no-enforce-eager",
        help="vLLM: no torch.compile or CUDA graphs: starts sooner, streams far slower "
        "(default: off)",
    ),
    lora_modules: list[str] = typer.Option(
        [], "--lora-modules", help="NAME=PATH of an adapter to load at start (repeatable)"
    ),
    shipped_adapter: bool | None = typer.Option(
        None,
        "--shipped-adapter/--no-shipped-adapter",
        help="With the default model, load the adapter that ships for it, through which the "
        "shipped personas speak until they have their own (default: on)",
    ),
    adapters_dir: Path | None = typer.Option(
        None,
        help="Adapter registry whose current versions are loaded at start "
        "(default: $ROLECAST_ADAPTERS_DIR, else <home>/adapters)",
    ),
    engine: str | None = typer.Option(
        None, help="embedded (this server) | vllm (run `vllm serve`) (default: embedded)"
    ),
    print_command: bool = typer.Option(
        False, "--print-command", help="With --engine vllm: print the command, do not run it"
    ),
    prepare_only: bool = typer.Option(
        False,
        "--prepare-only",
        help="Convert/cache the model (the default model's checkpoint, also for --engine vllm), "
        "print its path, then exit without serving",
    ),
) -> None:
    """Serve the OpenAI-compatible API (as vLLM does) with the embedded engine."""
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
        "gpu_memory_utilization": gpu_memory_utilization,
        "kv_cache_memory_gb": kv_cache_memory_gb,
        "enforce_eager": enforce_eager,
        "engine": engine,
        "shipped_adapter": shipped_adapter,
    }
    if lora_modules:
        given["lora_modules"] = _parse_lora_modules(lora_modules)
    settings = load(ServeSettings, **given)
    paths = resolve(adapters_dir=adapters_dir)
    if settings.engine == "vllm":
        if prepare_only and print_command:
            raise typer.BadParameter("--prepare-only and --print-command exclude each other")
        run_vllm(settings, paths, print_only=print_command, prepare_only=prepare_only)
        return
    if print_command:
        raise typer.BadParameter("--print-command goes with --engine vllm")
    run_server(settings, paths, prepare_only=prepare_only)


def run_vllm(
    settings: Any, paths: RolecastPaths, *, print_only: bool, prepare_only: bool = False
) -> None:
    from formats.registry import AdapterRegistry
    from serving.errors import ModelLoadError
    from serving.vllm_launcher import build_vllm_command, exec_vllm, format_command, vllm_model_path

    try:
        model_path = vllm_model_path(settings, prepare=not print_only, cache_dir=paths.cache_dir)
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if prepare_only:
        typer.echo(f"model ready: {model_path}")
        return
    argv, env = build_vllm_command(
        settings, AdapterRegistry(paths.adapters), model_path, cache_dir=paths.cache_dir
    )
    if print_only:
        typer.echo(format_command(argv, env))
        return
    try:
        exec_vllm(argv, env)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def run_server(settings: Any, paths: RolecastPaths, *, prepare_only: bool = False) -> None:
    from serving.errors import ModelLoadError
    from serving.models import resolve_model_path

    try:
        if prepare_only:
            path = resolve_model_path(settings.model, paths.cache_dir)
            typer.echo(f"model ready: {path}")
            return
        # Resolve (and convert) before uvicorn starts, so a bad model is a clear CLI error.
        resolve_model_path(settings.model, paths.cache_dir)
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    import uvicorn

    from serving.app import build_app

    config = uvicorn.Config(
        build_app(settings, paths),
        host=settings.host,
        port=settings.port,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        timeout_graceful_shutdown=10,
    )
    _announcing_server()(config).run()


def _announcing_server() -> Any:
    """The server class, made here: uvicorn is imported only by `rolecast serve`."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        """uvicorn's server that says on stderr, once it listens, where (one line)."""

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.started:  # it could not bind: uvicorn has said why
                return
            from serving.discovery import client_url

            port = self.config.port
            for server in self.servers:  # the port bound, for --port 0
                for sock in server.sockets:
                    port = sock.getsockname()[1]
            url = client_url(self.config.host, port)
            typer.echo(f"serving on {url} (OpenAI API at {url}/v1)", err=True)

    return AnnouncingServer


adapters_app = typer.Typer(
    help="Versioned persona adapters: list, publish (hot, no failed request), roll back.",
    no_args_is_help=True,
)

_DIR_HELP = "Adapter registry (default: $ROLECAST_ADAPTERS_DIR, else <home>/adapters)"
_SERVER_HELP = (
    "Model server to tell (default: $ROLECAST_SERVER_URL and every `rolecast serve` running "
    "with this registry; with none, only the registry files change)"
)
_JSON_HELP = "Print the result as one JSON object (for programs)."


def registry_for(adapters_dir: Path | None) -> Any:
    """The registry every `rolecast serve|adapters` command uses: `--adapters-dir`, else the
    shared one (`formats.paths`: $ROLECAST_ADAPTERS_DIR, else <home>/adapters)."""
    from formats.registry import AdapterRegistry

    return AdapterRegistry(resolve(adapters_dir=adapters_dir).adapters)


def _servers(paths: RolecastPaths, explicit: str | None, http: Any) -> tuple[list[Any], list[str]]:
    """The servers to tell, and notes on those that could not be: `--server` (it must answer),
    else ROLECAST_SERVER_URL and every running `rolecast serve` of this registry."""
    from serving.discovery import running_servers
    from serving.publish import ServerClient

    if explicit:
        return [ServerClient(explicit, http)], []
    found: dict[str, ServerClient] = {}
    notes = []
    if configured := os.environ.get("ROLECAST_SERVER_URL"):
        server = ServerClient(configured, http)
        if server.health():
            found[server.root] = server
        else:
            notes.append(f"the configured server (ROLECAST_SERVER_URL={configured}) did not answer")
    for entry in running_servers(paths.run_dir, paths.adapters):
        server = ServerClient(entry.url, http)
        found.setdefault(server.root, server)
    return list(found.values()), notes


def _publisher(
    paths: RolecastPaths, server: str | None, base_model: str | None, http: Any
) -> tuple[Any, list[str]]:
    from formats.registry import AdapterRegistry
    from serving.publish import Publisher
    from serving.settings import ServeSettings

    servers, notes = _servers(paths, server, http)
    publisher = Publisher(
        AdapterRegistry(paths.adapters),
        servers,
        max_rank=load(ServeSettings).max_lora_rank,
        base_model=base_model,
        cache_dir=paths.cache_dir,
    )
    return publisher, notes


def _report(
    result: Any, paths: RolecastPaths, notes: list[str], summary: str, *, as_json: bool
) -> None:
    """The outcome: the summary line, then where it took effect, or plainly that only the
    registry files changed and what to do about a server that is running."""
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "type": "result",
                    "persona": result.persona,
                    "new": result.new.served_name if result.new is not None else None,
                    "old": result.old.served_name if result.old is not None else None,
                    "unloaded": result.unloaded,
                    "servers": result.servers,
                    "registry": str(paths.adapters),
                    "message": summary,
                    "notes": notes,
                },
                ensure_ascii=False,
            )
        )
        return
    typer.echo(summary)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if result.servers:
        typer.echo(f"told {', '.join(result.servers)}")
        return
    typer.echo(
        f"Only the registry files changed ({paths.adapters}): no model server is configured "
        f"(ROLECAST_SERVER_URL) or running from {paths.home}. A server started from now on "
        f"serves {result.new_name} for {result.persona}; a server that is already running "
        "elsewhere keeps what it loaded until you restart it (or pass --server URL to tell a "
        "running server next time)."
    )


@adapters_app.command("list")
def adapters_list(
    adapters_dir: Path | None = typer.Option(None, help=_DIR_HELP),
) -> None:
    """Every persona's versions, with metrics, and which one is live."""
    from formats.errors import FormatError

    registry = registry_for(adapters_dir)
    personas = registry.personas()
    if not personas:
        typer.echo(f"no adapters in {registry.root}")
    for persona in personas:
        # one persona's broken files are reported and skipped, never the end of the listing
        try:
            current = registry.current(persona)
        except FormatError as exc:
            typer.echo(f"error: {exc}", err=True)
            current = None
        try:
            versions = registry.versions(persona)
        except FormatError as exc:
            typer.echo(f"error: {exc}", err=True)
            continue
        for v in versions:
            mark = "*" if current and current.version == v.version else " "
            metrics = v.manifest.metrics
            shown = " ".join(f"{k}={val}" for k, val in sorted(metrics.items()))
            created = v.manifest.created or "?"
            try:
                rank = str(v.rank)
            except FormatError as exc:
                rank = "?"
                typer.echo(f"error: {v.served_name}: {exc}", err=True)
            typer.echo(f"{mark} {v.served_name:<24} rank={rank:<4} {created}  {shown}".rstrip())


@adapters_app.command("publish")
def adapters_publish(
    adapter: Path = typer.Argument(..., help="PEFT adapter directory (with rolecast.json)"),
    persona: str = typer.Option(..., help="Persona it speaks for"),
    adapters_dir: Path | None = typer.Option(None, help=_DIR_HELP),
    server: str | None = typer.Option(None, help=_SERVER_HELP),
    base_model: str | None = typer.Option(
        None, help="Base model it must match (default: the server's, else the current version's)"
    ),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Validate, add as the next version, hot-load, switch, drain and unload the old one."""
    import httpx

    from formats.errors import FormatError

    paths = resolve(adapters_dir=adapters_dir)
    try:
        with httpx.Client(timeout=30) as http:
            publisher, notes = _publisher(paths, server, base_model, http)
            result = publisher.publish(persona, adapter)
    except FormatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    old = result.old.served_name if result.old else "none"
    summary = f"published {result.new_name} (was {old}; unloaded: {result.unloaded})"
    _report(result, paths, notes, summary, as_json=as_json)


@adapters_app.command("rollback")
def adapters_rollback(
    persona: str = typer.Argument(..., help="Persona to return to its previous version"),
    adapters_dir: Path | None = typer.Option(None, help=_DIR_HELP),
    server: str | None = typer.Option(None, help=_SERVER_HELP),
    as_json: bool = typer.Option(False, "--json", help=_JSON_HELP),
) -> None:
    """Return a persona to its previous version (from the first one: to the base model), the
    same safe way as a publish."""
    import httpx

    from formats.errors import FormatError

    paths = resolve(adapters_dir=adapters_dir)
    try:
        with httpx.Client(timeout=30) as http:
            publisher, notes = _publisher(paths, server, None, http)
            result = publisher.rollback(persona)
    except FormatError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    summary = f"{persona} is back on {result.new_name} (was {result.old_name})"
    _report(result, paths, notes, summary, as_json=as_json)


def register(app: typer.Typer) -> None:
    """Add the serving commands to the root app."""
    app.command("serve")(serve)
    app.add_typer(adapters_app, name="adapters")
