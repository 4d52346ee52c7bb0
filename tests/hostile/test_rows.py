"""Hostile ShareGPT / OpenAI rows through `rolecast data check` and `rolecast data clean`,
invoked as the command line invokes them: no row crashes either, rows whose text cannot be
encoded are reported as `bad_text`, and what `clean` writes passes `check`."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner

from rolecast.cli import app
from tests.hostile.properties import PROFILES, run_property, tally
from tests.hostile.strategies import jsonl_file

runner = CliRunner()


@pytest.fixture(autouse=True)
def built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the command line's click command once rather than on every invocation (most of
    an invocation's time here): the property runs hundreds of them."""
    monkeypatch.setattr(typer.testing, "_get_command", functools.cache(typer.main.get_command))


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def has_lone_surrogate(line: bytes) -> bool:
    """Whether a JSON line decodes to text holding a lone surrogate."""
    if not SURROGATE_ESCAPE.search(line):
        return False
    try:
        obj = json.loads(line.decode("utf-8"))  # as `data check` reads a line
    except (ValueError, RecursionError):
        return False
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, str) and re.search("[\ud800-\udfff]", value):
            return True
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
    return False


def check_rows(lines: list[bytes], folder: Path) -> None:
    data = folder / "rows.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    checked = runner.invoke(app, ["data", "check", "--base", "", "--json", str(data)])
    assert checked.exception is None or isinstance(checked.exception, SystemExit), checked.output
    assert checked.exit_code in (0, 2), checked.output
    report = json.loads(checked.stdout)
    assert report["rows"] == sum(1 for line in data.read_bytes().split(b"\n") if line.strip())
    codes = report["problems_by_code"]
    if any(has_lone_surrogate(line) for line in lines):
        assert codes.get("bad_text"), report
    for code in codes:
        tally(f"problem: {code}")

    out = folder / "clean.jsonl"
    cleaned = runner.invoke(app, ["data", "clean", str(data), "-o", str(out), "--base", ""])
    assert cleaned.exception is None or isinstance(cleaned.exception, SystemExit), cleaned.output
    assert cleaned.exit_code == 0, cleaned.output
    recheck = runner.invoke(app, ["data", "check", "--base", "", "--json", str(out)])
    assert recheck.exit_code == 0, recheck.output
    kept = json.loads(recheck.stdout)
    assert kept["problems"] == []
    tally(f"rows kept: {min(kept['rows'], 3)}")


@PROFILES
def test_no_row_crashes_data_check_or_clean(
    profile: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("rows")
    run_property(profile, jsonl_file, lambda lines: check_rows(lines, folder))


def test_the_named_rows_are_reported_not_crashed_on(tmp_path: Path) -> None:
    good = {
        "id": "ok",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    lines = [
        json.dumps(good),
        json.dumps({**good, "id": "s1", "conversations": [{"from": "human", "value": "\ud800"}]}),
        json.dumps({"id": "s2\udfff", "conversations": []}),
        '{"id": "deep", "conversations": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"id": "big", "conversations": [], "n": ' + "9" * 5000 + "}",
        '{"id": "[bold]markup[/]", "conversations": 5}',
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    human = runner.invoke(app, ["data", "check", "--base", "", str(data)])
    assert human.exit_code == 2, human.output
    assert "[bold]markup[/]" in human.stdout  # shown as text
    result = runner.invoke(app, ["data", "check", "--base", "", "--json", str(data)])
    report = json.loads(result.stdout)
    by_id = {p["id"]: p["code"] for p in report["problems"]}
    assert by_id["s1"] == "bad_text" and by_id["s2\ufffd"] == "bad_text"
    assert by_id["rows:4"] == "bad_json" and by_id["rows:5"] == "bad_json"
    assert report["usable_rows"] == 1
