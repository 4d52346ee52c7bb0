"""What the terminal commands share: one way to fail with a message, and loading the settings
(a bad setting is a message, not a traceback)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from bot.settings import BotSettings

err = Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}")
    return typer.Exit(code)


def load_settings(**overrides: Any) -> BotSettings:
    try:
        return BotSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise fail(f"invalid settings: {exc}") from None
