"""Dialogue rows and dataset_info.json: what is written reads back the same, in both shapes."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from formats.sharegpt import (
    ASSISTANT,
    SYSTEM,
    USER,
    jsonl_line,
    openai_row,
    read_dataset_info,
    read_messages,
    sharegpt_row,
    write_dataset_info,
)

text = st.text(min_size=0, max_size=40)
turn = st.fixed_dictionaries({"role": st.sampled_from([USER, ASSISTANT]), "content": text})
dialogue = st.tuples(st.one_of(st.none(), text), st.lists(turn, max_size=6)).map(
    lambda d: ([{"role": SYSTEM, "content": d[0]}] if d[0] is not None else []) + d[1]
)


@given(dialogue, st.text(min_size=1, max_size=12))
def test_rows_round_trip_in_both_shapes(messages: list[dict[str, str]], row_id: str) -> None:
    for row in (sharegpt_row(row_id, messages), openai_row(row_id, messages)):
        assert row["id"] == row_id
        parsed, problems = read_messages(json.loads(jsonl_line(row)))
        assert problems == [] and parsed == messages


def test_sharegpt_row_shape_and_what_a_reader_reports() -> None:
    row = sharegpt_row("haruhi_1", [{"role": SYSTEM, "content": "你是凉宫春日。"},
                                    {"role": USER, "content": "阿虚: 早"},
                                    {"role": ASSISTANT, "content": "迟到了！"}])  # fmt: skip
    assert row == {
        "id": "haruhi_1",
        "conversations": [
            {"from": "system", "value": "你是凉宫春日。"},
            {"from": "human", "value": "阿虚: 早"},
            {"from": "gpt", "value": "迟到了！"},
        ],
    }
    line = jsonl_line(row)
    assert line.endswith("\n") and "\n" not in line[:-1] and "凉宫春日" in line
    # the top-level system prompt LLaMA-Factory allows, and turns that cannot be read
    messages, problems = read_messages(
        {"system": "sys", "conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt"}]}
    )
    assert messages == [{"role": SYSTEM, "content": "sys"}]
    assert problems == [
        ("unknown_role", "turn 1 has role 'narrator'"),
        ("bad_format", "turn 2 has no 'from'/'value'"),
    ]
    assert read_messages([]) == (None, [("bad_format", "row is not a JSON object")])


def test_dataset_info_round_trips_as_llama_factory_reads_it(tmp_path: Path) -> None:
    files = {"haruhi_train": "haruhi_train.jsonl", "rolecast_atri": "atri.jsonl"}
    path = write_dataset_info(tmp_path, files)
    assert path == tmp_path / "dataset_info.json"
    raw = json.loads(path.read_text())
    assert raw["haruhi_train"] == {
        "file_name": "haruhi_train.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "system_tag": "system",
        },
    }
    entries = read_dataset_info(path)
    assert {name: e.file_name for name, e in entries.items()} == files
    assert {name: e.model_dump() for name, e in entries.items()} == raw


def test_a_top_level_system_prompt_that_is_not_text_is_reported() -> None:
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    for system in (5, ["sys"], {"text": "sys"}, True):
        messages, problems = read_messages({"system": system, "conversations": turns})
        assert problems == [("bad_format", "the top-level 'system' is not a string")]
        assert messages is not None and [m["role"] for m in messages] == [USER, ASSISTANT]
    for system in (None, "", "  "):  # no system prompt
        assert read_messages({"system": system, "conversations": turns})[1] == []


def test_a_jsonl_line_is_one_line_to_every_reader() -> None:
    """U+0085, U+2028 and U+2029 are line breaks to str.splitlines (and to JavaScript): written
    raw, a reply holding one would cut its row in two for a reader that splits lines so."""
    text = "一\x85二\u2028三\u2029四\x1c五\x0b六\r七"
    row = sharegpt_row(
        "r\u2028", [{"role": USER, "content": text}, {"role": ASSISTANT, "content": "好"}]
    )
    line = jsonl_line(row)
    assert line.splitlines() == [line[:-1]] and line.endswith("\n")
    assert json.loads(line) == row
    assert "凉宫" in jsonl_line({"id": "凉宫"})  # other text stays readable
