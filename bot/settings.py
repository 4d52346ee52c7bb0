"""The bot's settings, loaded once at the entry point.

Sources, strongest first: keyword arguments (CLI flags), environment variables prefixed
`ROLECAST_` (nested with `__`, e.g. `ROLECAST_SAMPLING__TEMPERATURE=0.9`), a TOML file
(`ROLECAST_CONFIG`, default `./rolecast.toml` when it exists), then the defaults below.
Secrets (the Discord token) come from the environment only and are never printed.

The directories the bot shares with the model server and the training side (`home`,
`cache_dir`, `adapters_dir`) are `formats.paths.RolecastPaths`'s, which these settings extend:
the bot resolves them exactly as `rolecast serve` and `rolecast adapters` do. Paths are made
absolute (`~` expanded), and a variable set to the empty string counts as unset.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from formats.paths import ENV_PREFIX, RolecastPaths, absolute, folder

log = logging.getLogger(__name__)


class SamplingSettings(BaseModel):
    """Sampling for one reply; every field maps onto the OpenAI/vLLM request."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(200, ge=1, le=8192, description="reply length limit, in tokens")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=2.0, description="1 = none (1.1 cost 1-4 BLEU-4 held out: RESULTS.md)"
    )
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        description="fixed seed for reproducible replies (int64, as the model server takes it)",
    )
    stop: list[str] = Field(default_factory=list)


def sampling_with(base: SamplingSettings, overrides: Mapping[str, object]) -> SamplingSettings:
    """`base` with `overrides` applied (a channel's, a scene member's, a terminal `/set`),
    validated; a ValueError naming each field that is wrong."""
    try:
        return SamplingSettings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise ValueError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None


def stored_sampling(base: SamplingSettings, overrides: Mapping[str, object]) -> SamplingSettings:
    """`base` with the stored `overrides` that are valid; one that is not (a row written by
    hand, a limit that changed since) is left out, so a channel always has sampling."""
    try:
        return sampling_with(base, overrides)
    except ValueError:
        kept: dict[str, object] = {}
        for key, value in overrides.items():
            try:
                sampling_with(base, {**kept, key: value})
            except ValueError as exc:
                log.warning("ignoring the stored sampling override %.40r: %s", key, exc)
            else:
                kept[key] = value
        return sampling_with(base, kept)


def describe_sampling(sampling: SamplingSettings) -> str:
    """`temperature=0.7, top_p=0.9, ...`: the settings that are set."""
    return ", ".join(
        f"{k}={v}" for k, v in sampling.model_dump().items() if k != "stop" and v is not None
    )


class DiscordSettings(BaseModel):
    """How the Discord bot behaves; the token itself is `discord_token` (environment only)."""

    model_config = ConfigDict(extra="forbid")

    cooldown_s: float = Field(3.0, ge=0, description="per-person cooldown between triggers")
    burst_window_s: float = Field(
        1.5, ge=0, description="messages from one person this close together get one answer"
    )
    edit_interval_s: float = Field(
        1.0, ge=0.2, description="a streamed reply is edited at most this often"
    )
    webhook_name: str = Field("Rolecast", min_length=1, max_length=80)
    proxy_window_s: float = Field(
        3.0,
        ge=0,
        le=60,
        description="a member's deleted message re-posted this close by another bot's webhook "
        "(PluralKit, Tupperbox) is kept as the re-post; other deletions wait this long; 0: off",
    )
    approval_threshold: int = Field(
        1, ge=1, description="thumbs-up minus thumbs-down that approve a reply for training"
    )
    dialogue_turns: int = Field(
        8, ge=1, le=64, description="turns before an approved reply kept in its dialogue"
    )
    sync_commands: bool = Field(True, description="sync the slash commands with Discord on start")
    sync_guild_id: int | None = Field(
        None, description="sync to this guild only (instant, for development)"
    )


class PromptSettings(BaseModel):
    """Memory beyond the window: rolling summaries and card lorebooks."""

    model_config = ConfigDict(extra="forbid")

    summaries: bool = Field(True, description="summarise turns that no longer fit the prompt")
    summary_max_tokens: int = Field(256, ge=32, le=2048)
    lore_budget_tokens: int = Field(256, ge=0, description="token budget of lorebook entries")
    lore_scan_depth: int = Field(4, ge=1, le=50, description="recent turns scanned for keys")


DEFAULT_TRAIN_LAUNCH = (
    "{python} -m rolecast train --data {train} --persona {persona} --base {base} --output {output}"
)


class RetrainSettings(BaseModel):
    """The retrain loop: approved dialogues -> adapter -> gate -> publish (`/retrain`)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(
        "default",
        description="base model to train on (`rolecast train --base`); must be the "
        "model server's base model",
    )
    launch: str = Field(
        DEFAULT_TRAIN_LAUNCH,
        description="training command; {python} {train} {validation} {persona} {base} {output} "
        "{workdir} are filled in, e.g. `accelerate launch -m rolecast train ...` or an ssh "
        "wrapper for a GPU host that sees the same paths",
    )
    train_args: list[str] = Field(
        default_factory=list, description="extra `rolecast train` flags, e.g. ['--epochs', '2']"
    )
    python: str | None = Field(
        None,
        description="the interpreter that runs the loop's `-m rolecast ...` steps (clean, "
        "split, train, eval, publish) and fills {python}; default: the bot's own. "
        "`rolecast-remote` runs them on a trainer (deploy/OPERATIONS.md)",
    )
    min_approved: int = Field(20, ge=2, description="approved dialogues a retrain needs")
    max_length: int = Field(2048, ge=16, description="longest dialogue kept, in tokens")
    validation: float = Field(0.1, gt=0.0, lt=1.0, description="held-out fraction for the gate")
    seed: int = Field(42, description="seed of the train / held-out split")
    replay: float = Field(
        1.0,
        ge=0.0,
        description="the other personas' approved dialogues (of the job's scope) added to the "
        "training file, each with its own system prompt, at most this many times the persona's "
        "own training dialogues; 0 = none",
    )
    tolerance: float = Field(
        1.0,
        ge=-100.0,
        le=100.0,
        description="BLEU-4 and ROUGE-L points (0-100) the new adapter may lose against the live "
        "one and still be published; negative = it must win by that much",
    )
    consistency_metric: Literal["own_probability", "recognised"] = Field(
        "own_probability",
        description="the persona-consistency figure the gate compares: the classifier's mean "
        "probability of the persona (steady on a few held-out replies) or the share of replies "
        "recognised as the persona's",
    )
    consistency_tolerance: float = Field(
        5.0,
        ge=-100.0,
        le=100.0,
        description="points (0-100) of persona consistency the new adapter may lose against the "
        "live one and still be published",
    )
    eval_max_new_tokens: int = Field(128, ge=1, le=4096)
    workdir: Path | None = Field(None, description="job directories; default <home>/retrain")
    poll_s: float = Field(1.0, gt=0, description="how often training progress is read")
    max_attempts: int = Field(
        3, ge=1, description="training launches per job (a resume after a crash is one more)"
    )
    status_interval_s: float = Field(
        3.0, ge=0.5, description="a Discord status message is edited at most this often"
    )

    @field_validator("workdir", mode="after")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        return folder(value) if value is not None else None


class BotSettings(RolecastPaths):
    """The bot's settings, with the shared directories (`home`, `cache_dir`, `adapters_dir`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    db_path: Path | None = Field(None, description="SQLite file; default <home>/rolecast.db")
    personas_dir: Path | None = Field(
        None, description="imported character cards; default <home>/personas"
    )
    server_url: str | None = Field(
        None,
        description="OpenAI-compatible base URL of the model server (vLLM or `rolecast serve`); "
        "unset = start the embedded server",
    )
    api_key: SecretStr = SecretStr("EMPTY")
    serve_args: list[str] = Field(
        default_factory=list,
        description="extra `rolecast serve` arguments for the embedded server, e.g. a --model",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="longest wait for the model server's next bytes"
    )
    reply_timeout_s: float = Field(
        600.0, gt=0, description="longest a streamed reply may take in all; it is cut there"
    )
    retry_attempts: int = Field(4, ge=1, le=20)
    retry_max_wait_s: float = Field(8.0, gt=0)
    server_startup_timeout_s: float = Field(600.0, gt=0)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    discord_token: SecretStr | None = None
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    prompt: PromptSettings = Field(default_factory=PromptSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)

    @field_validator("personas_dir", mode="after")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        return folder(value) if value is not None else None

    @field_validator("db_path", mode="after")
    @classmethod
    def _file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if (value := absolute(value)).is_dir():
            raise ValueError(f"{value} is a folder; the database is a file in it, e.g. rolecast.db")
        folder(value.parent)
        return value

    @field_validator("discord_token", mode="before")
    @classmethod
    def _no_blank_token(cls, value: object) -> object:
        # an env file's `ROLECAST_DISCORD_TOKEN=` or a pasted token's stray newline: Discord
        # would refuse both after a connection, where "no token" can be said before one
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return (value.strip() or None) if isinstance(value, str) else value

    @property
    def database(self) -> Path:
        return self.db_path or self.home / "rolecast.db"

    @property
    def user_personas(self) -> Path:
        return self.personas_dir or self.home / "personas"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def retrain_dir(self) -> Path:
        return self.retrain.workdir or self.home / "retrain"
