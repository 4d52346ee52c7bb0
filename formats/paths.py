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

Old variable names still work and warn once per process (`DEPRECATED`). A variable set to the
empty string (an env file's `ROLECAST_HOME=`) counts as unset. Every command loads its settings
through `load`, which turns whatever is wrong (a variable, a flag, the TOML file) into one
`SettingsProblem` whose message names it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import platformdirs
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
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

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

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
        return folder(value) if value is not None else None

    @property
    def adapters(self) -> Path:
        """The adapter registry's root."""
        return self.adapters_dir or self.home / "adapters"

    @property
    def run_dir(self) -> Path:
        """Where running model servers record their address (`rolecast serve`)."""
        return self.home / "run"


def absolute(path: Path) -> Path:
    """`~` expanded and made absolute: the same place for every process, whatever its working
    directory (a child process, a model server told where the registry is)."""
    return path.expanduser().absolute()


def folder(path: Path) -> Path:
    """`absolute(path)`, refused (ValueError) when it, or the nearest part of it that exists,
    is not a folder: found out when the settings load, not by the first write under it."""
    path = absolute(path)
    for part in (path, *path.parents):
        try:
            if not part.exists():
                continue
        except OSError:  # cannot be looked at: the write that needs it will say why
            break
        if not part.is_dir():
            raise ValueError(f"{part} is a file, not a folder")
        break
    return path


def resolve(**overrides: Any) -> RolecastPaths:
    """The shared directories, with the flags a command was given (None = not given)."""
    return load(RolecastPaths, **overrides)


class SettingsProblem(ValueError):
    """Settings that cannot be loaded: the message names each variable, flag or file that is
    wrong and says why, one line each."""


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S], flags: Mapping[str, str] | None = None, **given: Any) -> S:
    """`cls`'s settings with the values a command was given (None = not given), or a
    `SettingsProblem`. `flags` names the flag of each given field (default: `--field-name`)."""
    given = {k: v for k, v in given.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        names = {k: (flags or {}).get(k, "--" + k.replace("_", "-")) for k in given}
        problems = [_problem(cls, error, names) for error in exc.errors()]
    except SettingsError as exc:
        problems = [_unparsed(cls, exc)]
    except tomllib.TOMLDecodeError as exc:
        problems = [f"{config_file()} is not valid TOML: {exc}"]
    except OSError as exc:  # the TOML file exists but cannot be read
        problems = [f"{config_file()} cannot be read: {exc.strerror or exc}"]
    if len(problems) == 1:
        raise SettingsProblem(problems[0]) from None
    raise SettingsProblem("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _variable(cls: type[BaseSettings], loc: tuple[str, ...]) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    delimiter = cls.model_config.get("env_nested_delimiter") or ""
    return (prefix + (delimiter or "_").join(loc)).upper()


def _from_environment(name: str) -> bool:
    return any(key.upper() == name and value for key, value in os.environ.items())


def _problem(cls: type[BaseSettings], error: Any, flags: Mapping[str, str]) -> str:
    """One line for one pydantic error: where the value came from, what it was, what is wrong."""
    loc = tuple(str(part) for part in error["loc"])
    if not loc:
        return str(error["msg"])
    # the most precise place that was set: a flag, a variable (nested or whole), the TOML file
    where = ".".join(loc)
    if loc[0] in flags:
        where = flags[loc[0]]
    else:
        for n in range(len(loc), 0, -1):
            if _from_environment(variable := _variable(cls, loc[:n])):
                where = ", ".join([variable, *([".".join(loc[n:])] if n < len(loc) else [])])
                break
        else:
            if config_file().is_file() and issubclass(cls, RolecastPaths):
                where = f"{where} in {config_file()}"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "not a setting (misspelt?)"
    elif error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    shown = error.get("input")
    shown = str(shown) if isinstance(shown, Path) else shown
    secret = any(word in loc[-1] for word in ("token", "api_key", "secret"))  # never shown
    if isinstance(shown, str | int | float | bool) and not secret and error["type"] != "missing":
        return f"{where}={shown!r}: {message}"
    return f"{where}: {message}"


def _unparsed(cls: type[BaseSettings], exc: SettingsError) -> str:
    """A variable of a list or table setting that is not JSON (pydantic-settings parses them)."""
    found = re.search(r'field "([^"]+)"', str(exc))
    if found is None:
        return str(exc)
    variable = _variable(cls, (found.group(1),))
    if cls.model_config.get("env_nested_delimiter"):
        delimiter = cls.model_config.get("env_nested_delimiter")
        variable = f"{variable} (or a {variable}{delimiter}... variable)"
    return (
        f"{variable} is not valid JSON: a list or table setting is written as JSON, "
        'e.g. ["--epochs", "2"] or {"name": "value"}'
    )
