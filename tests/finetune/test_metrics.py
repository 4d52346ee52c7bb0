"""The metric functions against values computed by hand, and the eval report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune.data import Dialogue
from finetune.evaluate import eval_items, metrics_table, write_report
from finetune.metrics import bleu4, rouge, score_corpus


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
