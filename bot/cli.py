"""`rolecast chat`, `rolecast bot`, `rolecast persona`: the bot side's commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the bot commands to the root app."""
