"""`rolecast persona import|remove` from the command line: an existing key is kept unless
`--replace` is given; an operator's card under a shipped key is the operator's persona (it no
longer speaks through the shipped adapter) until it is removed; removing an imported card
unsets it in the channels that used it; shipped cards cannot be removed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.core.chat import ChatService
from bot.core.client import ModelClient
from bot.core.memory import Memory
from bot.core.personas import PersonaRegistry
from formats.basemodel import SHIPPED_NAME
from rolecast.cli import app
from tests.instant_server import InstantServer, ServerState

runner = CliRunner()


def card(path: Path, name: str) -> Path:
    data = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": name}}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROLECAST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def rolecast(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def test_import_keeps_an_existing_key_unless_replace_is_given(home: Path, tmp_path: Path) -> None:
    code, out = rolecast("persona", "import", str(card(tmp_path / "knight.json", "Sir One")))
    assert code == 0 and json.loads(out)["replaced"] is None
    code, out = rolecast("persona", "import", str(card(tmp_path / "knight.json", "Sir Two")))
    assert code == 2
    assert "'knight' is imported already (Sir One). Pass --replace to replace it." in out
    assert PersonaRegistry(home / "personas").load().get("knight").name == "Sir One"
    code, out = rolecast(
        "persona", "import", str(card(tmp_path / "knight.json", "Sir Two")), "--replace"
    )
    assert code == 0 and json.loads(out)["replaced"] == "imported"
    assert PersonaRegistry(home / "personas").load().get("knight").name == "Sir Two"


def test_a_key_shaped_like_a_servers_persona_is_refused(home: Path, tmp_path: Path) -> None:
    source = card(tmp_path / "x.json", "X")
    code, out = rolecast("persona", "import", str(source), "--key", "g123456-knight")
    assert code == 2 and "has the shape of a Discord server's persona key" in out


async def test_a_replaced_shipped_persona_is_the_operators_until_removed(
    home: Path, tmp_path: Path
) -> None:
    with InstantServer(ServerState(adapters=[SHIPPED_NAME])) as server:
        async with ModelClient(server.base_url, max_attempts=1) as client:

            async def served(registry: PersonaRegistry) -> str:
                async with Memory.open(":memory:") as memory:
                    chat = ChatService(memory, registry, client)
                    return await chat.served_by(registry.get("haruhi"))

            assert await served(PersonaRegistry(home / "personas").load()) == SHIPPED_NAME

            code, out = rolecast("persona", "import", str(card(tmp_path / "h.json", "Mine")),
                                 "--key", "haruhi")  # fmt: skip
            assert code == 2 and "'haruhi' ships with Rolecast (凉宫春日)" in out
            assert "Pass --replace" in out

            code, out = rolecast("persona", "import", str(card(tmp_path / "h.json", "Mine")),
                                 "--key", "haruhi", "--replace")  # fmt: skip
            assert code == 0 and json.loads(out)["replaced"] == "shipped"
            registry = PersonaRegistry(home / "personas").load()
            mine = registry.get("haruhi")
            assert mine.name == "Mine" and not mine.builtin and mine.shared
            # the shipped adapter learned the shipped card: the operator's card is not it
            assert await served(registry) == "instant-base"

            code, out = rolecast("persona", "remove", "haruhi")
            assert code == 0, out
            result = json.loads(out)
            assert result["now"] == "shipped" and result["channels_unset"] == 0
            registry = PersonaRegistry(home / "personas").load()
            assert registry.get("haruhi").builtin
            assert await served(registry) == SHIPPED_NAME


def test_remove_unsets_the_channels_that_used_it(home: Path, tmp_path: Path) -> None:
    rolecast("persona", "import", str(card(tmp_path / "knight.json", "Sir One")))

    async def channels() -> None:
        async with Memory.open(home / "rolecast.db") as memory:
            await memory.set_persona("discord:1", "knight")
            await memory.set_persona("discord:2", "knight")
            await memory.set_persona("terminal:default", "haruhi")

    async def after() -> tuple[str | None, str | None]:
        async with Memory.open(home / "rolecast.db") as memory:
            return (
                (await memory.channel("discord:1")).persona,
                (await memory.channel("terminal:default")).persona,
            )

    asyncio.run(channels())
    code, out = rolecast("persona", "remove", "knight")
    assert code == 0, out
    result = json.loads(out)
    assert result["channels_unset"] == 2 and result["now"] is None
    assert not (home / "personas" / "knight.json").exists()
    assert asyncio.run(after()) == (None, "haruhi")


def test_shipped_and_unknown_personas_cannot_be_removed(home: Path) -> None:
    code, out = rolecast("persona", "remove", "atri")
    assert code == 2 and "'atri' ships with Rolecast and cannot be removed" in out
    assert "--replace" in out
    code, out = rolecast("persona", "remove", "nobody")
    assert code == 2 and "No persona named 'nobody'" in out
    assert PersonaRegistry(home / "personas").load().get("atri").builtin


def test_list_names_the_server_that_owns_a_persona(home: Path, tmp_path: Path) -> None:
    from bot.core.cards import load_card

    registry = PersonaRegistry(home / "personas").load()
    registry.add("knight", load_card(card(tmp_path / "k.json", "Sir Guild")), guild_id="777")
    code, out = rolecast("persona", "list")
    assert code == 0 and "g777-knight" in out and "Discord server 777" in out
    code, out = rolecast("persona", "remove", "g777-knight")
    assert code == 0 and json.loads(out)["guild"] == "777"
