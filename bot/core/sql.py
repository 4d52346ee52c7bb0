"""Every SQL statement the bot runs, as named constants, and the numbered migrations.

A migration is applied once and recorded in `_migrations`; add new ones at the end of
`MIGRATIONS` (never edit an applied one). Times are Unix seconds (REAL).
"""

from __future__ import annotations

M001_INITIAL = """
CREATE TABLE channels (
    id          TEXT PRIMARY KEY,         -- 'discord:<channel id>' or 'terminal:<name>'
    persona     TEXT,                     -- active persona key, NULL until one is chosen
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);

CREATE TABLE turns (
    id           INTEGER PRIMARY KEY,
    channel_id   TEXT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    persona      TEXT NOT NULL,           -- the persona this turn was spoken to / by
    role         TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    author_id    TEXT,                    -- who wrote a user turn (Discord user id, terminal user)
    author_name  TEXT,
    content      TEXT NOT NULL,
    token_count  INTEGER,                 -- prompt tokens this turn costs; NULL until counted
    model        TEXT,                    -- served model name that wrote an assistant turn
    message_id   TEXT,                    -- the platform's message id, when there is one
    created_at   REAL NOT NULL
);

-- Recent turns of one persona in one channel, newest first: the prompt's only query.
CREATE INDEX turns_channel_persona_id ON turns (channel_id, persona, id);
"""

MIGRATIONS: list[tuple[str, str]] = [
    ("m001_initial", M001_INITIAL),
]

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)
"""
SELECT_APPLIED_MIGRATIONS = "SELECT name FROM _migrations"


def migration_transaction(name: str, script: str) -> str:
    """The migration and its record as one transaction, for `executescript`."""
    return (
        f"BEGIN;\n{script}\n"
        f"INSERT INTO _migrations (name, applied_at) "
        f"VALUES ('{name}', (julianday('now') - 2440587.5) * 86400.0);\nCOMMIT;"
    )


# channels
UPSERT_CHANNEL = """
INSERT INTO channels (id, persona, created_at, updated_at) VALUES (?, NULL, ?, ?)
ON CONFLICT (id) DO NOTHING
"""
SELECT_CHANNEL = "SELECT id, persona, created_at, updated_at FROM channels WHERE id = ?"
UPDATE_CHANNEL_PERSONA = "UPDATE channels SET persona = ?, updated_at = ? WHERE id = ?"

# turns
INSERT_TURN = """
INSERT INTO turns (channel_id, persona, role, author_id, author_name, content, token_count,
                   model, message_id, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
TURN_COLUMNS = (
    "id, channel_id, persona, role, author_id, author_name, content, token_count, model, "
    "message_id, created_at"
)
SELECT_RECENT_TURNS = f"""
SELECT {TURN_COLUMNS} FROM turns
WHERE channel_id = ? AND persona = ? AND id < ?
ORDER BY id DESC LIMIT ?
"""
SELECT_TURN = f"SELECT {TURN_COLUMNS} FROM turns WHERE id = ?"
UPDATE_TURN_TOKEN_COUNT = "UPDATE turns SET token_count = ? WHERE id = ?"
COUNT_CHANNEL_TURNS = "SELECT COUNT(*) FROM turns WHERE channel_id = ?"
DELETE_CHANNEL_TURNS = "DELETE FROM turns WHERE channel_id = ?"
DELETE_TURN = "DELETE FROM turns WHERE id = ?"
