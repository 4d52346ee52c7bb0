"""The shared directories: one variable each, XDG-aware defaults, the TOML file, and old
variable names that still work and warn once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.settings import BotSettings
from formats import paths
from formats.paths import RolecastPaths


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("ROLECAST_HOME", "ROLECAST_CACHE_DIR", "ROLECAST_ADAPTERS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ROLECAST_SERVE_ADAPTERS_DIR", raising=False)
    monkeypatch.setenv("ROLECAST_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    paths._warn_deprecated.cache_clear()
    return monkeypatch


def test_defaults_follow_xdg(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = RolecastPaths()
    assert found.home == tmp_path / "data" / "rolecast"
    assert found.cache_dir == tmp_path / "cache" / "rolecast"
    assert found.adapters == found.home / "adapters"
    assert found.run_dir == found.home / "run"


def test_one_variable_each(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("ROLECAST_HOME", str(tmp_path / "home"))
    clean_env.setenv("ROLECAST_CACHE_DIR", "~/rolecast-cache")
    found = RolecastPaths()
    assert found.home == tmp_path / "home" and found.adapters == tmp_path / "home" / "adapters"
    assert found.cache_dir == Path.home() / "rolecast-cache"
    clean_env.setenv("ROLECAST_ADAPTERS_DIR", str(tmp_path / "shared"))
    assert RolecastPaths().adapters == tmp_path / "shared"
    assert paths.resolve(adapters_dir=tmp_path / "flag").adapters == tmp_path / "flag"  # a flag
    # the bot resolves them the same way, being the same settings
    bot = BotSettings()
    assert (bot.home, bot.cache_dir, bot.adapters) == (
        found.home,
        found.cache_dir,
        tmp_path / "shared",
    )


def test_the_old_variable_works_and_warns_once(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setenv("ROLECAST_SERVE_ADAPTERS_DIR", str(tmp_path / "old"))
    with caplog.at_level(logging.WARNING, logger="formats.paths"):
        assert RolecastPaths().adapters == tmp_path / "old"
        assert BotSettings().adapters == tmp_path / "old"
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "ROLECAST_SERVE_ADAPTERS_DIR is deprecated: set ROLECAST_ADAPTERS_DIR instead "
        "(it means the same)."
    ]
    caplog.clear()
    clean_env.setenv("ROLECAST_ADAPTERS_DIR", str(tmp_path / "new"))
    with caplog.at_level(logging.WARNING, logger="formats.paths"):
        assert RolecastPaths().adapters == tmp_path / "new"  # the new name wins
        assert RolecastPaths().adapters == tmp_path / "new"
    assert len(caplog.records) == 1 and "ignored" in caplog.records[0].getMessage()
    # a child process given the same registry by flag is told to rename, not that it is ignored
    paths._warn_deprecated.cache_clear()
    clean_env.delenv("ROLECAST_ADAPTERS_DIR")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="formats.paths"):
        assert paths.resolve(adapters_dir=tmp_path / "old").adapters == tmp_path / "old"
    assert [r.getMessage() for r in caplog.records] == warnings


def test_the_toml_file_is_read_by_every_side(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "rolecast.toml"
    config.write_text(f'home = "{tmp_path / "toml-home"}"\n[sampling]\ntemperature = 0.3\n')
    clean_env.setenv("ROLECAST_CONFIG", str(config))
    assert RolecastPaths().adapters == tmp_path / "toml-home" / "adapters"  # bot keys ignored
    bot = BotSettings()
    assert bot.adapters == tmp_path / "toml-home" / "adapters"
    assert bot.sampling.temperature == 0.3
    clean_env.setenv("ROLECAST_HOME", str(tmp_path / "env-home"))
    assert RolecastPaths().home == tmp_path / "env-home"  # the environment wins over the file
