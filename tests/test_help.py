"""The commands' `--help` says what the configuration resolves: one variable per directory."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rolecast.cli import app


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["adapters", "list"],
        ["adapters", "publish"],
        ["adapters", "rollback"],
        ["retrain"],
    ],
)
def test_registry_help_names_the_one_variable(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "ROLECAST_ADAPTERS_DIR" in result.output and "<home>/adapters" in result.output
    assert "ROLECAST_SERVE_ADAPTERS_DIR" not in result.output


def test_publish_and_rollback_help_say_which_servers_are_told() -> None:
    for command in (["adapters", "publish"], ["adapters", "rollback"]):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
        assert "ROLECAST_SERVER_URL" in result.output and "only the registry files" in result.output
