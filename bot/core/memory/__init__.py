"""Per-channel memory in SQLite: the active persona (or a scene's cast) and every turn,
through aiosqlite.

One `Memory` is opened by the entry point (`async with Memory.open(path) as memory`) and
passed to whatever needs it. Turns are never dropped to make a prompt fit; only an explicit
deletion does: a reset (`clear_channel`), forget-me (`forget_author`), a member deleting their
message (`erase_messages`).

A turn belongs to a persona: the one that wrote a reply, or the one a member's message was
addressed to. A channel's history is the turns of its cast: one persona's turns in a channel
with one persona (as before scenes), every cast member's in a scene. Where a method takes
`persona: Cast`, a key reads one persona's turns and a tuple of keys a cast's.

Where each part lives (every query is in `bot.core.sql`):

- `store.py`: the `Memory` class: opening and migrating the database, the locks, a channel's
  persona, its turns and the platform messages they were posted as. It inherits the rest:
- `scenes.py`: a scene's cast, turn policy and last speaker (`ScenesMixin`);
- `settings.py`: channel settings, the guild's admin role, removing a persona everywhere
  (`SettingsMixin`);
- `dialogues.py`: ratings and approved dialogues (`DialoguesMixin`);
- `forgetting.py`: forget-me, members' deleted, edited and proxied messages, and compacting the
  file (`ForgettingMixin`);
- `summaries.py`: rolling summaries (`SummariesMixin`);
- `records.py`: the records they read and write (`Turn`, `ChannelSettings`, `Dialogue`,
  `Summary`, `Forgotten`, `Erased`, `Rewritten`...).
"""

from bot.core.memory.records import (
    ChannelSettings,
    Dialogue,
    Erased,
    Forgotten,
    Rewritten,
    Summary,
    Turn,
    TurnPolicy,
)
from bot.core.memory.store import Memory

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
