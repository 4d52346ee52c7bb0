"""Where Rolecast's files live: the one place that resolves them for every command.

Three directories, one environment variable each:

| directory | variable | default (Linux; platformdirs elsewhere) |
| --- | --- | --- |
| home: database, imported cards, logs, the adapter registry | `ROLECAST_HOME` | `$XDG_DATA_HOME/rolecast` (`~/.local/share/rolecast`) |
| cache: the default model's converted checkpoint | `ROLECAST_CACHE_DIR` | `$XDG_CACHE_HOME/rolecast` (`~/.cache/rolecast`) |
| adapter registry, shared with every model server | `ROLECAST_ADAPTERS_DIR` | `<home>/adapters` |

Each may also come from the TOML file (`$ROLECAST_CONFIG`, default `./rolecast.toml`) as `home`,
`cache_dir` or `adapters_dir`; a flag given to a command wins over both. The bot's settings extend
`RolecastPaths`, and `rolecast serve`, `rolecast adapters` and `rolecast train` resolve theirs
through it, so the bot, the CLI and every model server see the same registry.

Old variable names still work and warn once per process (`DEPRECATED`).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

log = logging.getLogger(__name__)

APP = "rolecast"
ENV_PREFIX = "ROLECAST_"

#: Old variable -> the field it set. The new variable (`ROLECAST_<FIELD>`) wins when both are set.
DEPRECATED: dict[str, str] = {
    "ROLECAST_SERVE_ADAPTERS_DIR": "adapters_dir",
}


def config_file() -> Path:
    """The TOML settings file: `$ROLECAST_CONFIG`, else `./rolecast.toml` (read when it exists)."""
    return Path(os.environ.get("ROLECAST_CONFIG", "rolecast.toml"))


def default_home() -> Path:
    """`$XDG_DATA_HOME/rolecast` on Linux, the platform's user data directory elsewhere."""
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/rolecast` on Linux, the platform's user cache directory elsewhere."""
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


@functools.cache
def _warn_deprecated(old: str, new: str, used: bool) -> None:
    """Once per process and variable: say what to set instead."""
    if used:
        log.warning("%s is deprecated: set %s instead (it means the same).", old, new)
    else:
        log.warning(
            "%s is deprecated and ignored: %s (or a flag, or rolecast.toml) sets it.", old, new
        )


class RolecastPaths(BaseSettings):
    """The directories every package shares. Extra keys (the bot's own settings in the same
    environment or TOML file) are ignored here; `BotSettings` extends this class and forbids them."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    home: Path = Field(
        default_factory=default_home,
        description="data directory: database, imported cards, logs, the adapter registry",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="cache: the default model's converted checkpoint",
    )
    adapters_dir: Path | None = Field(
        None,
        description="adapter registry shared with every model server (vLLM loads adapters by "
        "path, so each process must see it under this path); default <home>/adapters",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)

    @model_validator(mode="before")
    @classmethod
    def _deprecated_variables(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for old, field in DEPRECATED.items():
            value = os.environ.get(old)
            if not value:
                continue
            new = ENV_PREFIX + field.upper()
            given = data.get(field)
            # "ignored" only when it would have meant something else than what was given
            _warn_deprecated(old, new, given is None or Path(str(given)) == Path(value))
            if given is None:
                data = {**data, field: value}
        return data

    @field_validator("home", "cache_dir", "adapters_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def adapters(self) -> Path:
        """The adapter registry's root."""
        return self.adapters_dir or self.home / "adapters"

    @property
    def run_dir(self) -> Path:
        """Where running model servers record their address (`rolecast serve`)."""
        return self.home / "run"


def resolve(**overrides: Any) -> RolecastPaths:
    """The shared directories, with the flags a command was given (None = not given)."""
    return RolecastPaths(**{k: v for k, v in overrides.items() if v is not None})
