"""Data checks, cleaning and splitting, on the shared persona data and on rows made here."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.data import (
    check_files,
    clean_rows,
    load_dialogues,
    read_rows,
    split_dialogues,
)
from finetune.errors import DataError
from formats import sharegpt
from rolecast.cli import app
from tests.finetune.ft_helpers import dialogue, write_jsonl


def _expected_defects(path: Path) -> tuple[set[str], set[str]]:
    """Ids that end on a user turn / have two user turns in a row, read straight from the JSON."""
    ends, twice = set(), set()
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        roles = [t["from"] for t in row["conversations"] if t["from"] != "system"]
        if roles and roles[-1] == "human" and "gpt" in roles:
            ends.add(row["id"])
        if any(a == b == "human" for a, b in itertools.pairwise(roles)):
            twice.add(row["id"])
    return ends, twice


@pytest.mark.parametrize("name", ["haruhi", "atri", "xin"])
def test_check_finds_the_malformed_shared_rows_by_id_and_reason(
    shared_data: Path, name: str
) -> None:
    path = shared_data / f"{name}.jsonl"
    report = check_files([path])
    ends, twice = _expected_defects(path)
    found = {
        code: {p.row_id for p in report.problems if p.code == code}
        for code in ("ends_on_user", "user_twice")
    }
    assert found["ends_on_user"] == ends
    assert found["user_twice"] == twice
    if name == "haruhi":  # the README: about a fifth of the dialogues are malformed
        assert 0.15 < len(ends | twice) / report.rows < 0.3
    for p in report.problems:
        assert p.source.startswith(f"{name}.jsonl:")


def test_bad_bytes_empty_text_and_length(tmp_path: Path) -> None:
    good = json.dumps(dialogue(1), ensure_ascii=False).encode()
    empty = dialogue(2)
    empty["conversations"][2]["value"] = "   "
    lines = [
        good,
        b'{"id": "bad", "conversations": [{"from": "human", "value": "\xff\xfe"}]}',
        json.dumps(empty, ensure_ascii=False).encode(),
        b"{not json",
        json.dumps(
            {
                "id": "oa",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ],
            }
        ).encode(),
        json.dumps({"id": "odd", "conversations": [{"from": "robot", "value": "x"}]}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = check_files(
        [path],
        count_tokens=lambda messages: sum(len(m["content"]) for m in messages),
        max_length=40,
    )
    codes = {(p.source, p.code) for p in report.problems}
    assert ("mixed.jsonl:2", "bad_utf8") in codes
    assert ("mixed.jsonl:3", "empty_text") in codes
    assert ("mixed.jsonl:4", "bad_json") in codes
    assert ("mixed.jsonl:6", "unknown_role") in codes
    assert (
        "mixed.jsonl:1",
        "too_long",
    ) in codes  # the system prompt plus two turns > 40 characters
    assert not any(p.row_id == "oa" for p in report.problems)  # OpenAI rows are read too


def test_near_duplicates_are_grouped(tmp_path: Path) -> None:
    a = dialogue(3, turns=3)
    b = json.loads(json.dumps(a))
    b["id"] = "copy"
    b["conversations"][-1]["value"] += "！"
    path = write_jsonl(tmp_path / "d.jsonl", [a, dialogue(50, turns=1), b])
    report = check_files([path])
    assert report.duplicate_groups == [["row_3", "copy"]]


def test_clean_trims_trailing_user_turns_and_drops_the_rest(tmp_path: Path) -> None:
    ends = dialogue(1, turns=2)
    ends["id"] = "ends"
    ends["conversations"].append({"from": "human", "value": "还有吗？"})
    twice = dialogue(2)
    twice["id"] = "twice"
    twice["conversations"].insert(2, {"from": "human", "value": "喂？"})
    rows = read_rows(write_jsonl(tmp_path / "c.jsonl", [dialogue(0), ends, twice]))
    result = clean_rows(rows)
    assert [d.row_id for d in result.kept] == ["row_0", "ends"]
    assert result.kept[1].messages[-1]["role"] == "assistant"
    assert result.trimmed == ["ends"]
    assert [(p.row_id, p.code) for p in result.dropped] == [("twice", "user_twice")]


def test_split_is_reproducible_and_disjoint(tmp_path: Path) -> None:
    dialogues = load_dialogues(write_jsonl(tmp_path / "s.jsonl", [dialogue(i) for i in range(40)]))
    train, val = split_dialogues(dialogues, 0.2, seed=7)
    _train2, val2 = split_dialogues(list(reversed(dialogues)), 0.2, seed=7)
    assert len(val) == 8
    assert {d.row_id for d in val} == {d.row_id for d in val2}
    assert not {d.row_id for d in train} & {d.row_id for d in val}
    _, val3 = split_dialogues(dialogues, 0.2, seed=8)
    assert {d.row_id for d in val3} != {d.row_id for d in val}


def test_load_dialogues_refuses_a_malformed_file(shared_data: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dialogues(shared_data / "haruhi.jsonl")
    assert "rolecast data clean" in str(info.value)
    assert any("ends_on_user" in p for p in info.value.problems)


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path: Path) -> None:
    """Editors on Windows save UTF-8 with a BOM and CRLF line ends: the first row is a row."""
    lines = [json.dumps(dialogue(i), ensure_ascii=False) for i in range(3)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    report = check_files([path])
    assert report.rows == 3 and report.problems == []
    assert [r.row_id for r in read_rows(path)] == ["row_0", "row_1", "row_2"]


def test_a_directory_or_an_unreadable_file_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError, match="is a directory"):
        read_rows(tmp_path)
    path = write_jsonl(tmp_path / "locked.jsonl", [dialogue(0)])

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # as for another user's file (root reads all)
    with pytest.raises(DataError, match="cannot be read: Permission denied"):
        read_rows(path)


def test_clean_over_its_input_is_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-o` may name the input: a write that fails half-way leaves the file as it was."""
    path = write_jsonl(tmp_path / "d.jsonl", [dialogue(i) for i in range(5)])
    before = path.read_bytes()
    real = sharegpt.jsonl_line
    written = []

    def fail_on_the_third(row: dict) -> str:
        written.append(row["id"])
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real(row)

    monkeypatch.setattr(sharegpt, "jsonl_line", fail_on_the_third)
    result = CliRunner().invoke(app, ["data", "clean", str(path), "-o", str(path), "--base", ""])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.stderr and "Traceback" not in result.output
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]  # no temporary file left over
    monkeypatch.setattr(sharegpt, "jsonl_line", real)
    result = CliRunner().invoke(app, ["data", "clean", str(path), "-o", str(path), "--base", ""])
    assert result.exit_code == 0, result.output
    assert len(read_rows(path)) == 5


@pytest.mark.parametrize("command", ["clean", "split"])
def test_an_output_that_cannot_be_written_is_one_error_line(tmp_path: Path, command: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [dialogue(i) for i in range(10)])
    (tmp_path / "folder").mkdir()
    flag = ["-o"] if command == "clean" else ["--output-dir"]
    targets = [tmp_path / "d.jsonl" / "x"] + ([tmp_path / "folder"] if command == "clean" else [])
    for target in targets:
        args = ["data", command, str(path), *flag, str(target)]
        result = CliRunner().invoke(app, args + (["--base", ""] if command == "clean" else []))
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and str(target) in result.stderr
        assert not isinstance(result.exception, OSError)
    assert (tmp_path / "folder").is_dir() and not any((tmp_path / "folder").iterdir())
    result = CliRunner().invoke(app, ["data", command, str(path), *flag, str(tmp_path / "a/b/c")])
    assert result.exit_code == 0, result.output  # missing folders are made


@pytest.mark.parametrize("threshold", ["0", "1.5", "nan"])
def test_a_dedup_threshold_out_of_range_is_one_error_line(tmp_path: Path, threshold: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [dialogue(i) for i in range(3)])
    for command in (["check", str(path)], ["clean", str(path), "-o", str(tmp_path / "o.jsonl")]):
        args = ["data", *command, "--base", "", "--dedup-threshold", threshold]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and "threshold" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_rows_without_a_usable_id_are_named_by_their_line(tmp_path: Path) -> None:
    """A null, empty or structured id is no id: two such rows are not duplicates of each other."""
    ids: list[object] = [None, "", "  ", ["a"], {"k": 1}, True, 7, "x"]
    rows = []
    for i, row_id in enumerate(ids):
        row = dialogue(i)
        row["id"] = row_id
        rows.append(row)
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    read = read_rows(path)
    assert [r.row_id for r in read] == [f"ids:{n}" for n in range(1, 7)] + ["7", "x"]
    assert all(r.problems == [] for r in read)
    assert len(clean_rows(read).kept) == len(ids)


def test_a_row_with_unreadable_turns_is_reported_for_them_alone(tmp_path: Path) -> None:
    """The turns left after an unreadable one are not the file's dialogue: no structure problems
    are made up from them (the human turn below is not missing), and such rows are neither
    near-duplicates nor lengths of the usable rows."""
    bad_turn = [{"from": "human", "value": None}, {"from": "gpt", "value": "好的。"}]
    again = dialogue(0)  # a repeated id leaves the dialogue whole: it is checked as one
    again["conversations"].append({"from": "human", "value": "还有吗？"})
    rows = [{"id": f"bad{i}", "conversations": bad_turn} for i in range(3)]
    path = write_jsonl(tmp_path / "t.jsonl", [*rows, dialogue(0), again])
    report = check_files([path])
    assert {(p.row_id, p.code) for p in report.problems} == {
        *((f"bad{i}", "bad_format") for i in range(3)),
        ("row_0", "duplicate_id"),
        ("row_0", "ends_on_user"),
    }
    assert report.duplicate_groups == []
    assert report.lengths.count == 2 and report.usable_rows == 1


def test_rows_with_problems_are_counted_as_rows_not_ids(tmp_path: Path) -> None:
    ends = dialogue(0)
    ends["conversations"].append({"from": "human", "value": "还有吗？"})
    path = write_jsonl(tmp_path / "r.jsonl", [ends, dialogue(0), dialogue(1)])
    summary = check_files([path]).to_json()  # row_0 twice: it ends on a user turn, then again
    assert (summary["rows_with_problems"], summary["usable_rows"]) == (2, 1)
    with pytest.raises(DataError, match="2 of 3 rows"):
        load_dialogues(path)


# A template that refuses what Mistral's and Gemma's refuse: roles out of turn, a system turn.
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
)


def test_rows_a_chat_template_refuses_are_problems_not_crashes(
    tmp_path: Path, smol_tokenizer: object
) -> None:
    import copy

    from finetune.errors import TemplateError
    from finetune.template import count_tokens

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = STRICT_TEMPLATE  # type: ignore[attr-defined]
    plain = {"id": "plain", "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "yo"}]}  # fmt: skip
    twice = dialogue(1)
    twice["id"] = "twice"
    twice["conversations"].insert(2, {"from": "human", "value": "喂？"})
    path = write_jsonl(tmp_path / "t.jsonl", [plain, dialogue(0), twice])

    def counter(messages: object) -> int:
        return count_tokens(tokenizer, messages)  # type: ignore[arg-type]

    report = check_files([path], counter, 2048)
    assert {(p.row_id, p.code) for p in report.problems} == {
        ("row_0", "template_refused"),  # its system turn
        ("twice", "user_twice"),  # reported once, not again by the template
    }
    assert "System role not supported" in report.problems[0].message
    assert report.lengths.count == 1 and report.lengths.unit == "tokens"
    result = clean_rows(read_rows(path), counter, 2048)
    assert [d.row_id for d in result.kept] == ["plain"]
    assert {(p.row_id, p.code) for p in result.dropped} == {
        ("row_0", "template_refused"),
        ("twice", "user_twice"),
    }
    tokenizer.chat_template = None  # type: ignore[attr-defined]
    with pytest.raises(TemplateError, match="no chat template"):
        check_files([path], counter, 2048)


@pytest.mark.parametrize(
    "command",
    [
        ["data", "check", "{bad}"],
        ["data", "clean", "{bad}", "-o", "{out}"],
        ["train", "--data", "{bad}", "--persona", "p", "--output", "{out}"],
        ["train", "--data", "{good}", "--validation_data", "{bad}", "--persona", "p",
         "--output", "{out}"],
    ],
)  # fmt: skip
@pytest.mark.parametrize("bad", ["missing.jsonl", "a-directory"])
def test_a_file_that_cannot_be_read_is_reported_before_a_tokenizer_loads(
    command: list[str], bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the default tokenizer on a fresh machine converts the default model first
    (tens of seconds): a wrong path must not wait for that to be told."""
    import finetune.models

    def no_tokenizer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tokenizer was loaded before the data file was checked")

    monkeypatch.setattr(finetune.models, "load_tokenizer", no_tokenizer)
    (tmp_path / "a-directory").mkdir()
    good = write_jsonl(tmp_path / "good.jsonl", [dialogue(0)])
    names = {"bad": str(tmp_path / bad), "good": str(good), "out": str(tmp_path / "out")}
    result = CliRunner().invoke(app, [arg.format(**names) for arg in command])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # one error line, no traceback
    assert bad in result.output
