"""The Discord bot against the real embedded model server (`rolecast serve`) with a tiny random
Llama and SmolLM2's tokenizer: real /tokenize counts, real SSE streaming, real SQLite."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.core.sidecar import EmbeddedServer
from tests.discord.conftest import ADMIN, Rig, make_rig, read_jsonl
from tests.discord.fakediscord import invoke, message_command_data


@pytest.fixture(scope="module")
def embedded(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    log = tmp_path_factory.mktemp("embedded") / "server.log"
    with EmbeddedServer(
        ["--model", str(tiny_model_dir)], log_path=log, startup_timeout=180
    ) as server:
        yield server


@pytest.fixture
async def real(
    tmp_path: Path, embedded: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    async for rig in make_rig(tmp_path, embedded.base_url, monkeypatch):
        yield rig


async def test_chat_approve_and_export_on_the_embedded_server(real: Rig):
    rig = real
    await rig.command("persona set", {"name": "haruhi"})
    await rig.memory.set_channel_sampling(rig.key, {"max_tokens": 12, "seed": 0})
    await rig.say(f"{rig.mention()} 你好，春日！")
    posts = rig.api.posts_in(rig.channel.id)
    assert len(posts) == 2 and posts[1].username == "凉宫春日" and posts[1].content.strip()
    turns = list(reversed(await rig.memory.recent_turns(rig.key, "haruhi", limit=10)))
    assert [t.role for t in turns] == ["assistant", "user", "assistant"]
    # Token counts from the server's /tokenize are cached in the rows.
    assert all(t.token_count and t.token_count > 0 for t in turns[:2])
    assert turns[2].model is not None

    reply = rig.bot._connection._get_message(posts[1].message_id)
    assert reply is not None
    await invoke(
        rig.bot, rig.channel, rig.alice, message_command_data(reply, "Approve for training")
    )
    await rig.command("export", {"persona": "haruhi"}, permissions=ADMIN)
    files = rig.api.responses[-1].files
    records = read_jsonl(files["haruhi.jsonl"])
    assert records[0]["conversations"][-1] == {"from": "gpt", "value": turns[2].content}
    assert json.loads(files["dataset_info.json"])["rolecast_haruhi"]["columns"] == {
        "messages": "conversations"
    }

    await rig.command("status", permissions=ADMIN)
    fields = {f["name"]: f["value"] for f in json.loads(rig.api.texts()[-1])["fields"]}
    assert fields["Model server"].startswith("up")
