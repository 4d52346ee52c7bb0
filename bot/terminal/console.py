"""What the terminal commands share: one way to fail with a message, and loading the settings
(a bad setting is a message, not a traceback)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from bot.settings import BotSettings
from formats.paths import SettingsProblem, load

err = Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}")
    return typer.Exit(code)


#: The flag of each setting a terminal command can be given.
FLAGS = {"db_path": "--db", "server_url": "--server", "adapters_dir": "--adapters-dir"}


def load_settings(**overrides: Any) -> BotSettings:
    try:
        return load(BotSettings, FLAGS, **overrides)
    except SettingsProblem as exc:
        raise fail(str(exc)) from None
