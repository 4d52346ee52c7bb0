"""`rolecast bot`: the offline check, the missing-token error, and no torch in the bot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def rolecast(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ROLECAST_")}
    environ.update({"XDG_DATA_HOME": str(home), "ROLECAST_CONFIG": str(home / "none.toml"), **env})
    return subprocess.run(
        [sys.executable, "-m", "rolecast", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=False,
    )


def test_check_prints_the_command_tree_without_connecting(tmp_path: Path):
    result = rolecast(tmp_path, "bot", "--check", ROLECAST_DISCORD_TOKEN="secret-token-value")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["discord_token"] == "set"
    assert "secret-token-value" not in result.stdout + result.stderr
    names = {c["name"]: c for c in report["commands"]}
    assert {"persona", "memory", "channel", "admin", "export", "status"} <= set(names)
    assert names["Approve for training"]["type"] == 3
    subs = {o["name"] for o in names["persona"]["options"]}
    assert subs == {"set", "list", "info", "import", "remove"}
    assert {o["name"] for o in names["memory"]["options"]} == {"show", "reset", "forget-me"}
    assert int(names["export"]["default_member_permissions"]) == 1 << 5  # Manage Server
    assert {p["key"] for p in report["personas"]} >= {"haruhi", "atri", "xin"}
    # one line for a person on stderr, no traceback, no warning about voice libraries
    assert result.stderr.splitlines() == [
        f"ok: {len(report['personas'])} personas, {len(names)} commands, token set, "
        "model server embedded"
    ]


def test_check_without_a_token_is_not_ok(tmp_path: Path):
    result = rolecast(tmp_path, "bot", "--check")
    assert result.returncode == 2
    assert json.loads(result.stdout)["ok"] is False
    assert result.stderr.splitlines() == [
        "error: no Discord token: set ROLECAST_DISCORD_TOKEN (settings and cards are valid)"
    ]


def test_check_reports_a_broken_card(tmp_path: Path):
    personas = tmp_path / "rolecast" / "personas"
    personas.mkdir(parents=True)
    (personas / "broken.json").write_text('{"spec": "chara_card_v2", "data": {}}')
    result = rolecast(tmp_path, "bot", "--check")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["discord_token"] == "missing"
    problems = report["problems"][0]["problems"]
    assert "spec_version: required field is missing" in problems
    assert "data.name: required field is missing" in problems


def test_bot_without_token_says_what_to_do(tmp_path: Path):
    result = rolecast(tmp_path, "bot", "--server", "http://127.0.0.1:9/v1")
    assert result.returncode == 2
    assert "ROLECAST_DISCORD_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_discord_is_one_line_before_the_model_server_starts(tmp_path: Path):
    from bot.core.sidecar import free_port

    # the real `rolecast bot`, with Discord's API at a loopback port where nothing listens
    code = (
        "import sys, discord.http\n"
        f"discord.http.Route.BASE = 'http://127.0.0.1:{free_port()}/api/v10'\n"
        "sys.argv = ['rolecast', 'bot']\n"
        "from rolecast.cli import main\n"
        "main()\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ROLECAST_")}
    environ.update(
        {"ROLECAST_HOME": str(tmp_path), "ROLECAST_CONFIG": str(tmp_path / "none.toml"),
         "ROLECAST_DISCORD_TOKEN": "token-of-an-offline-bot"}
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 69
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: Cannot reach Discord (") and "check the network" in line
    assert "token-of-an-offline-bot" not in result.stderr
    assert not (tmp_path / "logs" / "server.log").exists()  # no model server was started


@pytest.mark.parametrize("module", ["bot.discord.bot"])
def test_the_bot_process_never_imports_torch(module: str):
    code = (
        "import asyncio, sys\n"
        f"import {module}\n"
        "from bot.discord.bot import command_tree\n"
        "from bot.settings import BotSettings\n"
        "asyncio.run(command_tree(BotSettings(server_url='http://127.0.0.1:9/v1')))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
