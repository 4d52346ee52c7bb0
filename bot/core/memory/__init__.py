"""Per-channel memory in SQLite (`store.py`), re-exported under its old name."""

from bot.core.memory.store import (
    ChannelSettings,
    Dialogue,
    Erased,
    Forgotten,
    Memory,
    Rewritten,
    Summary,
    Turn,
    TurnPolicy,
)

__all__ = [
    "ChannelSettings",
    "Dialogue",
    "Erased",
    "Forgotten",
    "Memory",
    "Rewritten",
    "Summary",
    "Turn",
    "TurnPolicy",
]
