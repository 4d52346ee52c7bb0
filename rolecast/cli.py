"""The `rolecast` console command.

Each package (`bot`, `serving`, `finetune`) contributes its own sub-commands through a
`register(app)` function in its `cli.py`; this root is the only module that imports all three.
Those modules import only light things at module level (typer, pydantic): a command that needs
torch imports it inside its function, so `rolecast chat` and `rolecast bot` stay plain HTTP
clients.
"""

from __future__ import annotations

import logging
import os

import typer

from bot.cli import register as register_bot
from finetune.cli import register as register_finetune
from serving.cli import register as register_serving

app = typer.Typer(
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
    level = logging.DEBUG if verbose else os.environ.get("ROLECAST_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


register_bot(app)
register_serving(app)
register_finetune(app)


def main() -> None:
    app()
