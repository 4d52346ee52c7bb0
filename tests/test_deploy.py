"""deploy/: the compose file and the env file template give the bot and the model server one
registry path, mounted where both see it, with one variable per thing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from bot.settings import BotSettings
from formats.paths import DEPRECATED
from serving.cli import registry_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose and systemd read them (comments and blank lines skipped,
    surrounding quotes dropped)."""
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def service_env(compose: dict, name: str) -> dict[str, str]:
    """A service's environment: its env_file (the template, as the README says to copy it),
    then its `environment`, which wins."""
    service = compose["services"][name]
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for file in [files] if isinstance(files, str) else files:
        assert file == "rolecast.env"
        env.update(read_env_file(DEPLOY / "rolecast.env.example"))
    extra = service.get("environment") or {}
    if isinstance(extra, list):
        extra = dict(item.split("=", 1) for item in extra)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mounts(compose: dict, name: str) -> dict[str, str]:
    """Named volumes of a service: container path -> volume."""
    found = {}
    for entry in compose["services"][name].get("volumes", []):
        source, _, target = str(entry).partition(":")
        found[target.split(":")[0]] = source
    return found


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def in_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith(("ROLECAST_", "XDG_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ROLECAST_CONFIG", "/nonexistent/rolecast.toml")
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_bot_and_model_server_resolve_one_registry(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        in_environment(m, service_env(compose, "bot"))
        bot_registry = BotSettings().adapters
        bot_home = BotSettings().home
    with monkeypatch.context() as m:
        in_environment(m, service_env(compose, "vllm"))
        server_registry = registry_for(None).root  # what `rolecast serve --engine vllm` loads
    assert bot_registry == server_registry == Path("/srv/rolecast/adapters")
    # ... and both see it there: the same named volume, mounted at that path in each
    assert mounts(compose, "bot")[str(bot_registry)] == mounts(compose, "vllm")[str(bot_registry)]
    assert str(bot_home) in mounts(compose, "bot")  # the database outlives the container


def test_one_variable_per_thing(compose: dict) -> None:
    template = read_env_file(DEPLOY / "rolecast.env.example")
    assert "ROLECAST_ADAPTERS_DIR" in template
    for name in ("bot", "vllm"):
        assert not set(DEPRECATED) & set(service_env(compose, name)), name
    units = [p.read_text() for p in (DEPLOY / "systemd").glob("*.service")]
    assert units and all("EnvironmentFile=/etc/rolecast/rolecast.env" in u for u in units)
    assert all(template["ROLECAST_ADAPTERS_DIR"] in u for u in units if "ReadWritePaths" in u)
