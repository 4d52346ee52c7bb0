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

M002_DISCORD = """
-- Discord channels belong to a guild (forget-me works per guild); admins set how a channel's
-- persona is triggered and how it samples (JSON of SamplingSettings fields, NULL = defaults).
ALTER TABLE channels ADD COLUMN guild_id TEXT;
ALTER TABLE channels ADD COLUMN mode TEXT NOT NULL DEFAULT 'mention'
    CHECK (mode IN ('mention', 'always'));
ALTER TABLE channels ADD COLUMN sampling TEXT;
CREATE INDEX channels_guild ON channels (guild_id);

CREATE INDEX turns_author ON turns (author_id);

CREATE TABLE guilds (
    id             TEXT PRIMARY KEY,      -- Discord guild id
    admin_role_id  TEXT,                  -- members with this role may use admin commands
    updated_at     REAL NOT NULL
);

-- Every platform message a stored turn was posted as (a long reply is split in several).
CREATE TABLE turn_messages (
    message_id  TEXT PRIMARY KEY,
    turn_id     INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE
);
CREATE INDEX turn_messages_turn ON turn_messages (turn_id);

-- One rating per person per reply: +1 (thumbs up) or -1 (thumbs down).
CREATE TABLE feedback (
    turn_id     INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL,
    rating      INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    created_at  REAL NOT NULL,
    PRIMARY KEY (turn_id, user_id)
);

-- Approved replies with the turns before them, frozen at approval time as training data
-- (a memory reset does not delete them; forget-me deletes those its caller wrote in).
CREATE TABLE dialogues (
    id           INTEGER PRIMARY KEY,
    turn_id      INTEGER NOT NULL UNIQUE,  -- the approved assistant turn
    channel_id   TEXT NOT NULL,
    guild_id     TEXT,
    persona      TEXT NOT NULL,
    messages     TEXT NOT NULL,            -- JSON list of {role, content, author_id, author_name}
    approved_by  TEXT,                     -- who approved it, NULL when reactions did
    source       TEXT NOT NULL CHECK (source IN ('command', 'reactions')),
    created_at   REAL NOT NULL
);
CREATE INDEX dialogues_persona ON dialogues (persona, id);

CREATE TABLE dialogue_authors (
    dialogue_id  INTEGER NOT NULL REFERENCES dialogues(id) ON DELETE CASCADE,
    author_id    TEXT NOT NULL,
    PRIMARY KEY (dialogue_id, author_id)
);
CREATE INDEX dialogue_authors_author ON dialogue_authors (author_id);

-- The rolling summary of a persona's older turns in a channel: it covers every turn with
-- id <= through_id; the prompt then carries only newer turns.
CREATE TABLE summaries (
    channel_id   TEXT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    persona      TEXT NOT NULL,
    content      TEXT NOT NULL,
    through_id   INTEGER NOT NULL,
    token_count  INTEGER,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (channel_id, persona)
);
"""

M003_RETRAIN = """
-- Retrain jobs: approved dialogues -> adapter -> gate -> publish, one row per job, its state
-- advanced step by step so that a restarted bot picks the job up where it stopped.
CREATE TABLE retrain_jobs (
    id             INTEGER PRIMARY KEY,
    persona        TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('queued', 'exporting', 'training',
                       'evaluating', 'publishing', 'done', 'rejected', 'failed')),
    reason         TEXT,                  -- why it was rejected or failed, or what it published
    requested_by   TEXT,                  -- Discord user id or 'terminal:<user>'
    guild_id       TEXT,                  -- export only this guild's dialogues (NULL = all)
    channel_id     TEXT,                  -- where the status message is (Discord)
    message_id     TEXT,
    min_approved   INTEGER NOT NULL,
    workdir        TEXT,
    pid            INTEGER,               -- the training process, while one runs
    attempts       INTEGER NOT NULL DEFAULT 0,  -- training launches (a resume is one more)
    step           INTEGER,
    total_steps    INTEGER,
    loss           REAL,
    tokens_per_s   REAL,
    eta_s          REAL,
    dialogues      INTEGER,               -- approved dialogues exported
    metrics        TEXT,                  -- JSON: the gate's table and verdict
    old_version    TEXT,                  -- served name live before the job, NULL = base model
    new_version    TEXT,                  -- served name it published
    created_at     REAL NOT NULL,
    exporting_at   REAL,
    training_at    REAL,
    evaluating_at  REAL,
    publishing_at  REAL,
    finished_at    REAL,
    updated_at     REAL NOT NULL
);
-- One active job per persona: a second request finds the first through this index.
CREATE UNIQUE INDEX retrain_jobs_one_active ON retrain_jobs (persona)
    WHERE state NOT IN ('done', 'rejected', 'failed');
CREATE INDEX retrain_jobs_persona ON retrain_jobs (persona, id);
"""

M004_TRAINING_PROCESS = """
-- The training process is known by its pid and its start time together, so a pid the system
-- gave to another process after the run ended is not mistaken for the run.
ALTER TABLE retrain_jobs ADD COLUMN pid_started REAL;
"""

M005_TURN_ENDINGS = """
-- How a reply ended: the server's finish_reason ('stop', 'length', ...; NULL when it sent
-- none), and whether the reply finished. complete = 0 for a reply cut at the token limit or
-- whose stream broke or ended without [DONE]: it is kept (it was shown) and marked as cut.
ALTER TABLE turns ADD COLUMN finish_reason TEXT;
ALTER TABLE turns ADD COLUMN complete INTEGER NOT NULL DEFAULT 1 CHECK (complete IN (0, 1));
"""

M006_RETRAIN_SOURCE = """
-- What a retrain job trains on: NULL = the persona's approved dialogues, else the path of a
-- dialogue file (ShareGPT or OpenAI JSONL) given to `rolecast retrain --data`.
ALTER TABLE retrain_jobs ADD COLUMN source TEXT;
"""

M007_SCENES = """
-- Scenes: several personas in one channel. A channel's cast, in the order it was gathered;
-- a channel with one persona has no rows here (its `channels.persona` is its cast), and a
-- channel with rows has its first member in `channels.persona`. `sampling` overrides the
-- channel's sampling for that persona (JSON of SamplingSettings fields, NULL = none).
CREATE TABLE cast_members (
    channel_id  TEXT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    persona     TEXT NOT NULL,
    position    INTEGER NOT NULL,
    sampling    TEXT,
    added_at    REAL NOT NULL,
    PRIMARY KEY (channel_id, persona)
);
CREATE INDEX cast_members_persona ON cast_members (persona);

-- Who answers a message addressed to nobody: the next in turn, or the persona whose name and
-- card keywords the message matches best; a persona handed the next turn takes it first.
-- Personas answer one another for at most `chain_limit` consecutive bot turns.
ALTER TABLE channels ADD COLUMN turn_policy TEXT NOT NULL DEFAULT 'round-robin'
    CHECK (turn_policy IN ('round-robin', 'keywords'));
ALTER TABLE channels ADD COLUMN chain_limit INTEGER NOT NULL DEFAULT 2
    CHECK (chain_limit BETWEEN 0 AND 10);
ALTER TABLE channels ADD COLUMN next_persona TEXT;

-- The member's turn a reply was written for (for replies in a chain, the member's turn that
-- started it): forget-me deletes a scene's replies to a member through it.
ALTER TABLE turns ADD COLUMN prompted_by INTEGER;
CREATE INDEX turns_prompted_by ON turns (prompted_by) WHERE prompted_by IS NOT NULL;

-- A scene's shared history: the newest turns of a channel, whoever spoke.
CREATE INDEX turns_channel_id ON turns (channel_id, id);
"""

M008_IDS_NEVER_REUSED = """
-- Turn and dialogue ids are never given again: SQLite gives a row the largest id plus one,
-- so once the newest rows were deleted (a reset, forget-me, a retry, a withdrawn approval)
-- the next row took a deleted one's id, and whatever still held that id (a reply checking
-- that the turns it answers are there, a message link, an approval, an export) found the
-- newer row. With AUTOINCREMENT ids only grow (the largest is kept in sqlite_sequence).
-- SQLite cannot add it to a table: both tables are rebuilt as its documentation says for
-- changing a table (create, copy with their ids, drop, rename, recreate the indexes), with
-- foreign keys off while it runs and checked before it commits (`Memory.migrate`).
CREATE TABLE turns_new (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id     TEXT NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    persona        TEXT NOT NULL,         -- the persona this turn was spoken to / by
    role           TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    author_id      TEXT,                  -- who wrote a user turn (Discord user id, terminal user)
    author_name    TEXT,
    content        TEXT NOT NULL,
    token_count    INTEGER,               -- prompt tokens this turn costs; NULL until counted
    model          TEXT,                  -- served model name that wrote an assistant turn
    message_id     TEXT,                  -- the platform's message id, when there is one
    created_at     REAL NOT NULL,
    finish_reason  TEXT,                  -- see m005
    complete       INTEGER NOT NULL DEFAULT 1 CHECK (complete IN (0, 1)),
    prompted_by    INTEGER                -- see m007
);
INSERT INTO turns_new (id, channel_id, persona, role, author_id, author_name, content,
                       token_count, model, message_id, created_at, finish_reason, complete,
                       prompted_by)
SELECT id, channel_id, persona, role, author_id, author_name, content, token_count, model,
       message_id, created_at, finish_reason, complete, prompted_by
FROM turns;
DROP TABLE turns;
ALTER TABLE turns_new RENAME TO turns;
CREATE INDEX turns_channel_persona_id ON turns (channel_id, persona, id);
CREATE INDEX turns_author ON turns (author_id);
CREATE INDEX turns_prompted_by ON turns (prompted_by) WHERE prompted_by IS NOT NULL;
CREATE INDEX turns_channel_id ON turns (channel_id, id);

CREATE TABLE dialogues_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    turn_id      INTEGER NOT NULL UNIQUE,  -- the approved assistant turn
    channel_id   TEXT NOT NULL,
    guild_id     TEXT,
    persona      TEXT NOT NULL,
    messages     TEXT NOT NULL,            -- JSON list of {role, content, author_id, author_name}
    approved_by  TEXT,                     -- who approved it, NULL when reactions did
    source       TEXT NOT NULL CHECK (source IN ('command', 'reactions')),
    created_at   REAL NOT NULL
);
INSERT INTO dialogues_new (id, turn_id, channel_id, guild_id, persona, messages, approved_by,
                           source, created_at)
SELECT id, turn_id, channel_id, guild_id, persona, messages, approved_by, source, created_at
FROM dialogues;
DROP TABLE dialogues;
ALTER TABLE dialogues_new RENAME TO dialogues;
CREATE INDEX dialogues_persona ON dialogues (persona, id);

-- New ids start above every id a row holds or still names: an approved dialogue, a summary
-- and a scene's reply keep the ids of turns deleted since.
DELETE FROM sqlite_sequence WHERE name IN ('turns', 'dialogues');
INSERT INTO sqlite_sequence (name, seq)
SELECT 'turns', COALESCE(MAX(id), 0) FROM (
    SELECT MAX(id) AS id FROM turns
    UNION ALL SELECT MAX(prompted_by) FROM turns
    UNION ALL SELECT MAX(turn_id) FROM turn_messages
    UNION ALL SELECT MAX(turn_id) FROM feedback
    UNION ALL SELECT MAX(turn_id) FROM dialogues
    UNION ALL SELECT MAX(through_id) FROM summaries
);
INSERT INTO sqlite_sequence (name, seq)
SELECT 'dialogues', COALESCE(MAX(id), 0) FROM (
    SELECT MAX(id) AS id FROM dialogues
    UNION ALL SELECT MAX(dialogue_id) FROM dialogue_authors
);
"""

M009_TURN_MESSAGE_INDEX = """
-- A member's message is found by its Discord id when they edit or delete it
-- (`Memory.erase_messages`, `Memory.rewrite_message`): without this index every such event
-- would read the whole channel's turns.
CREATE INDEX turns_message_id ON turns (message_id);
"""

MIGRATIONS: list[tuple[str, str]] = [
    ("m001_initial", M001_INITIAL),
    ("m002_discord", M002_DISCORD),
    ("m003_retrain", M003_RETRAIN),
    ("m004_training_process", M004_TRAINING_PROCESS),
    ("m005_turn_endings", M005_TURN_ENDINGS),
    ("m006_retrain_source", M006_RETRAIN_SOURCE),
    ("m007_scenes", M007_SCENES),
    ("m008_ids_never_reused", M008_IDS_NEVER_REUSED),
    ("m009_turn_message_index", M009_TURN_MESSAGE_INDEX),
]

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
    # Deleted rows are overwritten with zeros, not left in free space (forget-me, resets).
    "PRAGMA secure_delete=ON",
)
# After forget-me: rebuild the file without free pages, then fold the write-ahead log into it
# and empty the log, so no earlier version of a page (with deleted text) stays on disk.
VACUUM = "VACUUM"
CHECKPOINT_TRUNCATE = "PRAGMA wal_checkpoint(TRUNCATE)"

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)
"""
SELECT_APPLIED_MIGRATIONS = "SELECT name FROM _migrations"


def migration_transaction(name: str, script: str, *, commit: bool = True) -> str:
    """The migration and its record as one transaction, for `executescript`; left open
    (`commit=False`) for the caller to check before it commits."""
    return (
        f"BEGIN;\n{script}\n"
        f"INSERT INTO _migrations (name, applied_at) "
        f"VALUES ('{name}', (julianday('now') - 2440587.5) * 86400.0);\n"
        + ("COMMIT;" if commit else "")
    )


# While migrations run: a table rebuilt is dropped, and with foreign keys on that would delete
# the rows referencing it (ON DELETE CASCADE). The pragma is a no-op inside a transaction.
FOREIGN_KEYS_OFF = "PRAGMA foreign_keys=OFF"
FOREIGN_KEYS_ON = "PRAGMA foreign_keys=ON"
# table, rowid, referenced table, constraint index: one row per reference to a missing row
FOREIGN_KEY_CHECK = "PRAGMA foreign_key_check"


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
                   model, message_id, created_at, finish_reason, complete, prompted_by)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
TURN_COLUMNS = (
    "id, channel_id, persona, role, author_id, author_name, content, token_count, model, "
    "message_id, created_at, finish_reason, complete, prompted_by"
)
SELECT_RECENT_TURNS = f"""
SELECT {TURN_COLUMNS} FROM turns
WHERE channel_id = ? AND persona = ? AND id < ?
ORDER BY id DESC LIMIT ?
"""
# A scene's turns: those of the cast's personas (a JSON list), through the (channel, id) index.
SELECT_RECENT_CAST_TURNS = f"""
SELECT {TURN_COLUMNS} FROM turns
WHERE channel_id = ? AND persona IN (SELECT value FROM json_each(?)) AND id < ?
ORDER BY id DESC LIMIT ?
"""
# The persona of the newest reply among the cast's newest turns (round-robin goes on after it).
SELECT_LAST_SPEAKER = """
SELECT persona FROM (
    SELECT persona, role FROM turns
    WHERE channel_id = ? AND persona IN (SELECT value FROM json_each(?))
    ORDER BY id DESC LIMIT ?
) WHERE role = 'assistant' LIMIT 1
"""
SELECT_TURN = f"SELECT {TURN_COLUMNS} FROM turns WHERE id = ?"
# How many of these turns (a JSON list of ids) are stored; what they hold now.
COUNT_TURNS_IN = "SELECT COUNT(*) FROM turns WHERE id IN (SELECT value FROM json_each(?))"
SELECT_TURN_CONTENTS_IN = (
    "SELECT id, content FROM turns WHERE id IN (SELECT value FROM json_each(?))"
)
UPDATE_TURN_TOKEN_COUNT = "UPDATE turns SET token_count = ? WHERE id = ?"
COUNT_CHANNEL_TURNS = "SELECT COUNT(*) FROM turns WHERE channel_id = ?"
DELETE_CHANNEL_TURNS = "DELETE FROM turns WHERE channel_id = ?"
DELETE_TURN = "DELETE FROM turns WHERE id = ?"

# -- m002: Discord channels, guilds, approvals, summaries ----------------------------------

# The settings with the cast (a JSON list of [persona, sampling] pairs, in order), in one read.
SELECT_CHANNEL_SETTINGS = """
SELECT guild_id, mode, sampling, persona, turn_policy, chain_limit, next_persona,
       (SELECT json_group_array(json_array(persona, sampling))
        FROM (SELECT persona, sampling FROM cast_members m
              WHERE m.channel_id = channels.id ORDER BY position))
FROM channels WHERE id = ?
"""
UPDATE_CHANNEL_GUILD = "UPDATE channels SET guild_id = ? WHERE id = ? AND guild_id IS NOT ?"
UPDATE_CHANNEL_MODE = "UPDATE channels SET mode = ?, updated_at = ? WHERE id = ?"
UPDATE_CHANNEL_SAMPLING = "UPDATE channels SET sampling = ?, updated_at = ? WHERE id = ?"
CLEAR_PERSONA_EVERYWHERE = "UPDATE channels SET persona = NULL, updated_at = ? WHERE persona = ?"

# -- m006: scenes ----------------------------------------------------------------------------

SELECT_CAST_CHANNELS = "SELECT DISTINCT channel_id FROM cast_members WHERE persona = ?"
SELECT_CAST = "SELECT persona FROM cast_members WHERE channel_id = ? ORDER BY position"
INSERT_CAST_MEMBER = """
INSERT INTO cast_members (channel_id, persona, position, sampling, added_at)
VALUES (?, ?, (SELECT COALESCE(MAX(position), -1) + 1 FROM cast_members WHERE channel_id = ?),
        NULL, ?)
ON CONFLICT (channel_id, persona) DO NOTHING
"""
DELETE_CAST_MEMBER = "DELETE FROM cast_members WHERE channel_id = ? AND persona = ?"
DELETE_CAST = "DELETE FROM cast_members WHERE channel_id = ?"
DELETE_PERSONA_FROM_CASTS = "DELETE FROM cast_members WHERE persona = ?"
# After a member left: the first one left leads (is `channels.persona`), or none.
UPDATE_CHANNEL_LEAD = """
UPDATE channels SET persona = (SELECT persona FROM cast_members m WHERE m.channel_id = channels.id
                               ORDER BY position LIMIT 1),
                    updated_at = ?
WHERE id = ?
"""
UPDATE_CAST_SAMPLING = "UPDATE cast_members SET sampling = ? WHERE channel_id = ? AND persona = ?"
UPDATE_TURN_POLICY = """
UPDATE channels SET turn_policy = ?, chain_limit = ?, updated_at = ? WHERE id = ?
"""
UPDATE_NEXT_PERSONA = "UPDATE channels SET next_persona = ?, updated_at = ? WHERE id = ?"
CLEAR_NEXT_PERSONA_EVERYWHERE = "UPDATE channels SET next_persona = NULL WHERE next_persona = ?"

UPSERT_GUILD_ADMIN_ROLE = """
INSERT INTO guilds (id, admin_role_id, updated_at) VALUES (?, ?, ?)
ON CONFLICT (id) DO UPDATE SET admin_role_id = excluded.admin_role_id,
                               updated_at = excluded.updated_at
"""
SELECT_GUILD_ADMIN_ROLE = "SELECT admin_role_id FROM guilds WHERE id = ?"

INSERT_TURN_MESSAGE = "INSERT OR IGNORE INTO turn_messages (message_id, turn_id) VALUES (?, ?)"
UPDATE_TURN_MESSAGE_ID = "UPDATE turns SET message_id = ? WHERE id = ? AND message_id IS NULL"
SELECT_TURN_BY_MESSAGE = f"""
SELECT {", ".join("t." + c.strip() for c in TURN_COLUMNS.split(","))}
FROM turn_messages m JOIN turns t ON t.id = m.turn_id WHERE m.message_id = ?
"""
SELECT_LAST_ASSISTANT_ID = """
SELECT MAX(id) FROM turns WHERE channel_id = ? AND persona = ? AND role = 'assistant'
"""

UPSERT_FEEDBACK = """
INSERT INTO feedback (turn_id, user_id, rating, created_at) VALUES (?, ?, ?, ?)
ON CONFLICT (turn_id, user_id) DO UPDATE SET rating = excluded.rating,
                                             created_at = excluded.created_at
"""
DELETE_FEEDBACK = "DELETE FROM feedback WHERE turn_id = ? AND user_id = ? AND rating = ?"
SELECT_FEEDBACK_SCORE = """
SELECT COALESCE(SUM(CASE WHEN rating > 0 THEN 1 ELSE 0 END), 0),
       COALESCE(SUM(CASE WHEN rating < 0 THEN 1 ELSE 0 END), 0)
FROM feedback WHERE turn_id = ?
"""

INSERT_DIALOGUE = """
INSERT INTO dialogues (turn_id, channel_id, guild_id, persona, messages, approved_by, source,
                       created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (turn_id) DO NOTHING
"""
INSERT_DIALOGUE_AUTHOR = (
    "INSERT OR IGNORE INTO dialogue_authors (dialogue_id, author_id) VALUES (?, ?)"
)
DIALOGUE_COLUMNS = (
    "id, turn_id, channel_id, guild_id, persona, messages, approved_by, source, created_at"
)
SELECT_DIALOGUE_BY_TURN = f"SELECT {DIALOGUE_COLUMNS} FROM dialogues WHERE turn_id = ?"
SELECT_PERSONA_DIALOGUES = f"""
SELECT {DIALOGUE_COLUMNS} FROM dialogues WHERE persona = ? AND (? IS NULL OR guild_id = ?)
ORDER BY id
"""
COUNT_PERSONA_DIALOGUES = """
SELECT COUNT(*) FROM dialogues WHERE persona = ? AND (? IS NULL OR guild_id = ?)
"""
DELETE_DIALOGUE_BY_TURN = "DELETE FROM dialogues WHERE turn_id = ? AND source = ?"

# forget-me: everything that holds what a person said, or their id, within one guild
SELECT_AUTHOR_TURNS_IN_GUILD = f"""
SELECT {TURN_COLUMNS} FROM turns WHERE author_id = ?
AND channel_id IN (SELECT id FROM channels WHERE guild_id = ?)
"""
# For each of a person's turns, the persona reply that answered it (the first after it).
SELECT_REPLIES_TO_AUTHOR_IN_GUILD = """
SELECT DISTINCT (SELECT MIN(a.id) FROM turns a
                 WHERE a.channel_id = u.channel_id AND a.persona = u.persona
                 AND a.role = 'assistant' AND a.id > u.id)
FROM turns u WHERE u.author_id = ?
AND u.channel_id IN (SELECT id FROM channels WHERE guild_id = ?)
"""
# The replies written for a person's turns in a scene (directly, or later in the chain it began).
SELECT_PROMPTED_BY_AUTHOR_IN_GUILD = """
SELECT r.id FROM turns r JOIN turns u ON r.prompted_by = u.id
WHERE u.author_id = ? AND u.channel_id IN (SELECT id FROM channels WHERE guild_id = ?)
"""
SELECT_GUILD_ASSISTANT_TURNS_PAGE = """
SELECT id, content FROM turns WHERE role = 'assistant' AND id > ?
AND channel_id IN (SELECT id FROM channels WHERE guild_id = ?)
ORDER BY id LIMIT ?
"""
SELECT_GUILD_TURNS_MENTIONING = """
SELECT id, content FROM turns WHERE instr(content, ?) > 0
AND channel_id IN (SELECT id FROM channels WHERE guild_id = ?)
"""
UPDATE_TURN_CONTENT = "UPDATE turns SET content = ? WHERE id = ?"
SELECT_GUILD_DIALOGUES = f"SELECT {DIALOGUE_COLUMNS} FROM dialogues WHERE guild_id = ? ORDER BY id"
SELECT_AUTHOR_DIALOGUE_IDS_IN_GUILD = """
SELECT d.id FROM dialogues d WHERE d.guild_id = ?
AND (d.approved_by = ? OR d.id IN (SELECT dialogue_id FROM dialogue_authors WHERE author_id = ?))
"""
UPDATE_DIALOGUE_MESSAGES = "UPDATE dialogues SET messages = ? WHERE id = ?"
DELETE_DIALOGUE = "DELETE FROM dialogues WHERE id = ?"
DELETE_USER_FEEDBACK_IN_GUILD = """
DELETE FROM feedback WHERE user_id = ?
AND turn_id IN (SELECT t.id FROM turns t JOIN channels c ON c.id = t.channel_id
                WHERE c.guild_id = ?)
"""
UNLINK_RETRAIN_REQUESTER_IN_GUILD = """
UPDATE retrain_jobs SET requested_by = NULL WHERE requested_by = ? AND guild_id IS ?
"""
SELECT_RETRAIN_WORKDIRS = "SELECT workdir FROM retrain_jobs WHERE workdir IS NOT NULL"
DELETE_GUILD_SUMMARIES = """
DELETE FROM summaries WHERE channel_id IN (SELECT id FROM channels WHERE guild_id = ?)
"""

# A member edited or deleted their messages (`bot.core.edits`): only turns stored from a
# member's message (role 'user', its Discord id in `message_id`), of the channel the event came
# from, in a channel recorded as the event's guild's. ?1: the message ids, a JSON list of
# strings. (CROSS JOIN keeps SQLite reading the ids first and each turn through
# turns_message_id, not the whole channel.)
SELECT_MEMBER_TURNS_BY_MESSAGES = f"""
SELECT {", ".join("t." + c.strip() for c in TURN_COLUMNS.split(","))}
FROM json_each(?1) m CROSS JOIN turns t ON t.message_id = m.value
JOIN channels c ON c.id = t.channel_id
WHERE t.role = 'user' AND t.channel_id = ?2 AND c.guild_id = ?3
ORDER BY t.id
"""
# The persona replies written from these turns (a JSON list of ids), as forget-me finds them:
# the first reply after each of the persona it was addressed to, and in a scene every reply
# written for it or in the chain it began (`prompted_by`).
SELECT_REPLIES_TO_TURNS = f"""
SELECT {TURN_COLUMNS} FROM turns WHERE id IN (
    SELECT (SELECT MIN(a.id) FROM turns a
            WHERE a.channel_id = u.channel_id AND a.persona = u.persona
            AND a.role = 'assistant' AND a.id > u.id)
    FROM turns u WHERE u.id IN (SELECT value FROM json_each(?1))
    UNION
    SELECT r.id FROM turns r WHERE r.prompted_by IN (SELECT value FROM json_each(?1))
)
ORDER BY id
"""
# The approved dialogues that may hold a turn: the channel's, approved at or after it (a
# dialogue is a reply with the turns before it).
SELECT_CHANNEL_DIALOGUES_FROM = f"""
SELECT {DIALOGUE_COLUMNS} FROM dialogues WHERE channel_id = ? AND turn_id >= ? ORDER BY id
"""
DELETE_FEEDBACK_ON_TURNS = "DELETE FROM feedback WHERE turn_id IN (SELECT value FROM json_each(?))"
# The summaries that cover a turn: every summary of the channel through it or later.
DELETE_CHANNEL_SUMMARIES_FROM = "DELETE FROM summaries WHERE channel_id = ? AND through_id >= ?"
# An edited message: its new text, and its cached token count forgotten (it was the old text's).
UPDATE_TURN_TEXT = "UPDATE turns SET content = ?, token_count = NULL WHERE id = ?"
# A member's message re-posted by a proxy bot (`bot.core.proxies`): the turn follows the
# proxied message, with its text (proxy tags cut) and the character's name; the author id stays.
UPDATE_TURN_PROXIED = """
UPDATE turns SET message_id = ?, content = ?, author_name = ?, token_count = NULL WHERE id = ?
"""
# The member turns a reply of persona ?2 written now answers: those addressed to it since its
# last reply (before ?3), of which the reply will be the first reply after.
SELECT_UNANSWERED_TURNS = """
SELECT id FROM turns
WHERE channel_id = ?1 AND persona = ?2 AND role = 'user' AND id < ?3
AND id > COALESCE((SELECT MAX(id) FROM turns WHERE channel_id = ?1 AND persona = ?2
                   AND role = 'assistant' AND id < ?3), 0)
ORDER BY id
"""

SELECT_SUMMARY = """
SELECT content, through_id, token_count, updated_at FROM summaries
WHERE channel_id = ? AND persona = ?
"""
UPSERT_SUMMARY = """
INSERT INTO summaries (channel_id, persona, content, through_id, token_count, updated_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (channel_id, persona) DO UPDATE SET content = excluded.content,
    through_id = excluded.through_id, token_count = excluded.token_count,
    updated_at = excluded.updated_at
"""
UPDATE_SUMMARY_TOKEN_COUNT = """
UPDATE summaries SET token_count = ? WHERE channel_id = ? AND persona = ? AND through_id = ?
"""
DELETE_CHANNEL_SUMMARIES = "DELETE FROM summaries WHERE channel_id = ?"
SELECT_TURNS_BETWEEN = f"""
SELECT {TURN_COLUMNS} FROM turns
WHERE channel_id = ? AND persona = ? AND id > ? AND id < ?
ORDER BY id LIMIT ?
"""
SELECT_CAST_TURNS_BETWEEN = f"""
SELECT {TURN_COLUMNS} FROM turns
WHERE channel_id = ? AND persona IN (SELECT value FROM json_each(?)) AND id > ? AND id < ?
ORDER BY id LIMIT ?
"""

# -- m003: retrain jobs ----------------------------------------------------------------------

RETRAIN_JOB_COLUMNS = (
    "id, persona, state, reason, requested_by, guild_id, channel_id, message_id, min_approved, "
    "workdir, pid, attempts, step, total_steps, loss, tokens_per_s, eta_s, dialogues, metrics, "
    "old_version, new_version, created_at, exporting_at, training_at, evaluating_at, "
    "publishing_at, finished_at, updated_at, pid_started, source"
)
INSERT_RETRAIN_JOB = """
INSERT INTO retrain_jobs (persona, state, requested_by, guild_id, channel_id, message_id,
                          min_approved, source, created_at, updated_at)
VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)
"""
SELECT_RETRAIN_JOB = f"SELECT {RETRAIN_JOB_COLUMNS} FROM retrain_jobs WHERE id = ?"
SELECT_ACTIVE_RETRAIN_JOB = f"""
SELECT {RETRAIN_JOB_COLUMNS} FROM retrain_jobs
WHERE persona = ? AND state NOT IN ('done', 'rejected', 'failed')
"""
SELECT_ACTIVE_RETRAIN_JOBS = f"""
SELECT {RETRAIN_JOB_COLUMNS} FROM retrain_jobs
WHERE state NOT IN ('done', 'rejected', 'failed') ORDER BY id
"""
SELECT_RECENT_RETRAIN_JOBS = f"""
SELECT {RETRAIN_JOB_COLUMNS} FROM retrain_jobs
WHERE (? IS NULL OR persona = ?) ORDER BY id DESC LIMIT ?
"""
# The state and the timestamp of the state entered move together (?1 state, ?2 reason, ?3 now).
UPDATE_RETRAIN_JOB_STATE = """
UPDATE retrain_jobs SET state = ?1, reason = COALESCE(?2, reason), updated_at = ?3,
    exporting_at = CASE WHEN ?1 = 'exporting' THEN ?3 ELSE exporting_at END,
    training_at = CASE WHEN ?1 = 'training' THEN ?3 ELSE training_at END,
    evaluating_at = CASE WHEN ?1 = 'evaluating' THEN ?3 ELSE evaluating_at END,
    publishing_at = CASE WHEN ?1 = 'publishing' THEN ?3 ELSE publishing_at END,
    finished_at = CASE WHEN ?1 IN ('done', 'rejected', 'failed') THEN ?3 ELSE finished_at END
WHERE id = ?4
"""
UPDATE_RETRAIN_JOB_MESSAGE = """
UPDATE retrain_jobs SET channel_id = ?, message_id = ?, updated_at = ? WHERE id = ?
"""
UPDATE_RETRAIN_JOB_EXPORT = """
UPDATE retrain_jobs SET workdir = ?, dialogues = ?, old_version = ?, updated_at = ? WHERE id = ?
"""
UPDATE_RETRAIN_JOB_PID = """
UPDATE retrain_jobs SET pid = ?, pid_started = ?, attempts = attempts + ?, updated_at = ?
WHERE id = ?
"""
UPDATE_RETRAIN_JOB_PROGRESS = """
UPDATE retrain_jobs SET step = ?, total_steps = ?, loss = ?, tokens_per_s = ?, eta_s = ?,
    updated_at = ?
WHERE id = ?
"""
UPDATE_RETRAIN_JOB_RESULT = """
UPDATE retrain_jobs SET metrics = COALESCE(?, metrics), new_version = COALESCE(?, new_version),
    updated_at = ?
WHERE id = ?
"""
