"""A dialogue file given to `rolecast retrain --data`, as other tools write them: read as JSONL
(lines end at "\\n" only), and every line that is not a usable dialogue is a clear problem of
its own line, never an exception that ends the job. Fast: no child process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.core.memory import Memory
from bot.core.personas import Persona, PersonaRegistry
from bot.retrain.dataset import file_rows, read_lines
from bot.retrain.runner import RetrainService
from bot.settings import BotSettings


def dialogue(text: str = "你好") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "无聊！"}]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass"))
    return path


@pytest.fixture
def haruhi() -> Persona:
    return PersonaRegistry(None).load().get("haruhi")


def test_bad_lines_are_problems_of_their_own_line(haruhi: Persona, tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    lines = [
        json.dumps({"id": "ok", "messages": dialogue()}),
        deep,  # nests deeper than the JSON parser goes
        "{not json",
        json.dumps({"not": "a dialogue"}),
        '{"id": "lone", "messages": [{"role": "user", "content": "\\ud800"}, '
        '{"role": "assistant", "content": "x"}]}',  # a lone surrogate: cannot be written
    ]
    rows, problems = file_rows(write_lines(tmp_path / "mine.jsonl", lines), haruhi)
    assert [r["id"] for r in rows] == ["ok"]
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5"]
    assert "nests too deep" in problems[0]
    assert problems[1].startswith("line 3: bad_json: Expecting property name")
    assert "no 'conversations' or 'messages' list" in problems[2]
    assert "cannot be encoded" in problems[3]


def test_ids_that_are_not_strings_or_numbers_give_the_row_its_place(
    haruhi: Persona, tmp_path: Path
) -> None:
    ids: list[object] = [["a", "b"], {"k": 1}, None, True, "", 7, "mine"]
    lines = [json.dumps({"id": i, "messages": dialogue()}) for i in ids]
    rows, problems = file_rows(write_lines(tmp_path / "mine.jsonl", lines), haruhi)
    assert problems == []
    assert [r["id"] for r in rows] == [
        "mine:1", "mine:2", "mine:3", "mine:4", "mine:5", "7", "mine",
    ]  # fmt: skip


def test_line_breaks_inside_strings_do_not_split_rows(haruhi: Persona, tmp_path: Path) -> None:
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0ch", "i\x1ej", "k\x0bl"]
    # written raw, as tools that do not escape them write JSON
    lines = [
        json.dumps({"id": f"r{i}", "messages": dialogue(t)}, ensure_ascii=False)
        for i, t in enumerate(texts)
    ]
    path = write_lines(tmp_path / "raw.jsonl", lines)
    rows, problems = file_rows(path, haruhi)
    assert problems == [] and [r["conversations"][1]["value"] for r in rows] == texts
    assert [json.loads(line)["id"] for line in read_lines(path)] == [f"r{i}" for i in range(6)]


async def test_a_file_of_broken_lines_is_rejected_saying_why(
    memory: Memory,
    tmp_path: Path,
) -> None:
    data = write_lines(tmp_path / "bad.jsonl", ["[" * 100_000, '{"id": [1], "x": 2}'])
    settings = BotSettings(home=tmp_path, retrain={"min_approved": 2})  # type: ignore[arg-type]
    service = RetrainService(
        memory, PersonaRegistry(settings.user_personas).load(), settings, server_url=None
    )
    job = await service.wait((await service.start("haruhi", requested_by="t", data=data)).id)
    assert job.state == "rejected", job.reason
    reason = job.reason or ""
    assert reason.startswith(f"{data} has 0 usable dialogues; a retrain needs 2")
    assert "line 1: bad_json: nests too deep" in reason
    assert "line 2: bad_format: no 'conversations' or 'messages' list" in reason
    assert "Traceback" not in reason and "Error(" not in reason
