"""The `rolecast` console command.

Each package (`bot`, `serving`, `finetune`) contributes its own sub-commands through a
`register(app)` function in its `cli.py`; this root is the only module that imports all three.
Those modules import only light things at module level (typer, pydantic): a command that needs
torch imports it inside its function, so `rolecast chat` and `rolecast bot` stay plain HTTP
clients.

Whatever command it is, a setting that cannot be loaded (a variable, a flag, the TOML file) and
a file or folder the system refuses end here as one error line, never a traceback (`-v` logs it).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

import typer
from typer.core import TyperGroup

from bot.cli import register as register_bot
from finetune.cli import register as register_finetune
from formats.paths import SettingsProblem
from serving.cli import register as register_serving

log = logging.getLogger(__name__)


def _error(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


class _Commands(TyperGroup):
    """The root group: every command's bad settings and refused paths, said the same way."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        try:
            return super().invoke(ctx)
        except SettingsProblem as exc:
            raise _error(str(exc), 2) from None
        except OSError as exc:  # a folder that is a file, a permission, a full disk
            log.debug("refused by the system", exc_info=True)
            where = f"{exc.filename}: " if exc.filename else ""
            raise _error(f"{where}{exc.strerror or exc}", 1) from None


app = typer.Typer(
    cls=_Commands,
    name="rolecast",
    help="Role-play personas: chat in a terminal or on Discord, serve and train their adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    level = "DEBUG" if verbose else (os.environ.get("ROLECAST_LOG_LEVEL") or "WARNING").upper()
    if level not in logging.getLevelNamesMapping():
        names = ", ".join(n for n in logging.getLevelNamesMapping() if n not in ("WARN", "FATAL"))
        raise _error(f"ROLECAST_LOG_LEVEL={level.lower()!r}: not a log level ({names})", 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


register_bot(app)
register_serving(app)
register_finetune(app)


@app.command("runner")
def runner(
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(8200, min=0, max=65535, help="Port to listen on"),
    allow: str = typer.Option(
        "data,train,eval,adapters", help="The rolecast commands it runs, comma-separated"
    ),
) -> None:
    """Run the retrain loop's rolecast commands for a bot on another host (the trainer's side
    of `rolecast-remote`; ROLECAST_RUNNER_TOKEN, when set, must come with each request)."""
    import uvicorn

    from rolecast.runner import build_app

    allowed = tuple(a.strip() for a in allow.split(",") if a.strip())
    token = os.environ.get("ROLECAST_RUNNER_TOKEN") or None
    if token is None and not _loopback(host):
        typer.secho(
            f"error: the runner would run training commands for anyone who reaches {host}:{port}; "
            "set ROLECAST_RUNNER_TOKEN to a long random secret (e.g. `openssl rand -hex 32`) "
            "for the bot and the runner, or listen on 127.0.0.1",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    uvicorn.run(build_app(token=token, allowed=allowed), host=host, port=port, log_level="warning")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def main() -> None:
    app()
