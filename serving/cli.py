"""`rolecast serve` and `rolecast adapters`: the model server's commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the serving commands to the root app."""
