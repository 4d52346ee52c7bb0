"""`rolecast data|train|eval|compare`: the training side's commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the finetune commands to the root app."""
