"""The metric functions against values computed by hand, and the eval report files."""

from __future__ import annotations

import codecs
import json
import math
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from finetune.data import Dialogue
from finetune.evaluate import (
    eval_items,
    metrics_table,
    read_predictions,
    write_predictions,
    write_report,
)
from finetune.metrics import bleu4, rouge, score_corpus
from rolecast.cli import app


def test_bleu4_on_characters_with_method3_smoothing() -> None:
    assert bleu4("春日很开心", "春日很开心") == pytest.approx(100.0)
    # "abcd" vs "abce": 1..4-gram precisions 3/4, 2/3, 1/2, 0/1; method3 turns the zero count
    # into 1/(2 * 1); same length, so no brevity penalty
    expected = 100 * math.exp(
        (math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4
    )
    assert bleu4("abcd", "abce") == pytest.approx(round(expected, 4))
    # a hypothesis half as long pays the brevity penalty exp(1 - 8/4)
    short = 100 * math.exp(1 - 8 / 4)
    assert bleu4("abcd", "abcdabcd") == pytest.approx(round(short, 4), abs=1e-3)


def test_rouge_f1_on_jieba_tokens() -> None:
    scores = rouge("cat dog bird", "cat dog fish")
    # unigrams 2 of 3 both ways; bigrams 1 of 2; longest common subsequence 2 of 3
    assert scores["rouge-1"] == pytest.approx(66.6667, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(50.0, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(66.6667, abs=1e-3)
    assert rouge("", "cat") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert rouge("外星人", "外星人")["rouge-l"] == pytest.approx(100.0)


def test_corpus_score_is_the_mean_of_pairs() -> None:
    corpus = score_corpus(["cat dog bird", ""], ["cat dog fish", "cat"])
    assert corpus["rouge-1"] == pytest.approx(66.6667 / 2, abs=1e-3)
    assert corpus["bleu-4"] == pytest.approx(
        (bleu4("cat dog bird", "cat dog fish") + bleu4("", "cat")) / 2
    )


def test_eval_items_and_report(tmp_path: Path) -> None:
    d = Dialogue(
        "x",
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ],
    )
    (item,) = eval_items([d])
    assert item.reference == "a2" and item.context[-1]["content"] == "u2" and len(item.context) == 4
    records = [{"id": "x", "reference": "cat dog fish", "base": "bird", "adapter": "cat dog bird"}]
    results = write_report(records, tmp_path, "t")
    assert results["adapter"]["rouge-1"] > results["base"]["rouge-1"]
    assert json.loads((tmp_path / "metrics.json").read_text())["scores"] == results
    assert "| adapter |" in metrics_table(results)
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


GOOD = {"id": "a", "prompt": "p", "reference": "春日来了", "base": "春日", "adapter": "春日来了"}
BAD_PREDICTIONS = {
    "truncated": json.dumps(GOOD).encode() + b'\n{"id": "b", "reference": "x',
    "a column missing": (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "adapter": None})).encode(),
    "not text": json.dumps({**GOOD, "reference": 5, "base": ["x"]}).encode(),
    "not an object": b"[1, 2]\n",
    "bad bytes": b'{"id": "a", "reference": "\xff", "base": "x"}\n',
    "no model column": json.dumps({"id": "a", "reference": "x"}).encode(),
    "other columns": (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "baseline": "x"})).encode(),
    "empty": b"",
    "blank lines": b"\n  \n",
}


def _eval(*args: str) -> Result:
    return CliRunner().invoke(app, ["eval", *args])


@pytest.mark.parametrize("name", BAD_PREDICTIONS)
def test_a_predictions_file_that_cannot_be_scored_is_one_error_line(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(BAD_PREDICTIONS[name])
    result = _eval("--predictions", str(path), "--output", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {path}"), result.output
    assert isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_predictions_read_back_as_written(tmp_path: Path) -> None:
    """Replies may hold any text (U+2028, U+0085, U+001C are line breaks to str.splitlines, not
    to JSONL), and a file saved again by an editor may start with a byte order mark."""
    records = [{**GOOD, "adapter": "第一行\u2028第二\x85行\x1c", "reference": ""}, GOOD]
    path = write_predictions(records, tmp_path / "p" / "predictions.jsonl")
    assert read_predictions(path) == records
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_predictions(path) == records
    result = _eval("--predictions", str(path), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["dialogues"] == 2


def test_eval_outputs_that_cannot_be_written_or_read_are_one_error_line(tmp_path: Path) -> None:
    path = write_predictions([GOOD], tmp_path / "predictions.jsonl")
    for args in (
        ["--predictions", str(path), "--output", str(path)],  # a file, not a folder
        ["--predictions", str(tmp_path), "--output", str(tmp_path / "out")],
        ["--predictions", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")],
        ["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")],
    ):
        result = _eval(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: "), result.output
        assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_refuses_a_limit_below_one(tmp_path: Path, limit: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")  # fmt: skip
    result = _eval("--data", str(data), "--limit", limit, "--output", str(tmp_path / "out"))
    assert result.exit_code != 0 and "limit" in result.output.lower(), result.output
    assert isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()
