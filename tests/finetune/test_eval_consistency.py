"""`rolecast eval --persona P --consistency-data ...`: persona consistency beside BLEU/ROUGE in
metrics.json, learnt from dialogue files of the role-play data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.finetune.ft_helpers import write_jsonl


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def last_reply(row: dict) -> str:
    return [t["value"] for t in row["conversations"] if t["from"] == "gpt"][-1]


def rolecast(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rolecast", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_eval_reports_how_often_replies_sound_like_their_persona(
    data_dir: Path, tmp_path: Path
) -> None:
    haruhi, atri = rows(data_dir / "haruhi.jsonl"), rows(data_dir / "atri.jsonl")
    # learn from the first 30 dialogues of each; score replies of dialogues it never saw
    own = write_jsonl(tmp_path / "haruhi_train.jsonl", haruhi[:30])
    other = write_jsonl(tmp_path / "atri_train.jsonl", atri[:30])
    held = [r for r in haruhi[30:] if r["conversations"][-1]["from"] == "gpt"]
    atri_held = [last_reply(r) for r in atri[30:]]
    records = [
        {
            "id": r["id"],
            "prompt": "",
            "reference": last_reply(r),
            "base": "[24,483.483] שלום lorem ipsum",  # what an untrained base says
            "baseline": atri_held[i % len(atri_held)],  # another persona's voice
            "adapter": last_reply(r),  # the persona's own voice
        }
        for i, r in enumerate(held)
    ]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", records)
    out = tmp_path / "eval"
    result = rolecast(
        "eval", "--predictions", str(predictions), "--output", str(out), "--persona", "haruhi",
        "--consistency-data", str(own), "--consistency-data", f"atri={other}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recognised" in result.stdout and "own_probability" in result.stdout
    report = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    scores = report["scores"]
    for column in ("base", "baseline", "adapter"):
        assert {"bleu-4", "rouge-l", "recognised", "own_probability"} <= set(scores[column])
    assert scores["adapter"]["recognised"] > 50 > scores["baseline"]["recognised"]
    assert scores["base"]["recognised"] == 0.0
    assert scores["adapter"]["own_probability"] > scores["baseline"]["own_probability"]
    consistency = report["consistency"]
    assert consistency["persona"] == "haruhi"
    assert consistency["classes"] == ["(other speakers)", "atri", "haruhi"]
    assert consistency["learnt_from"]["haruhi"] > 0 and consistency["learnt_from"]["atri"] > 0
    assert consistency["references"]["recognised"] == scores["adapter"]["recognised"]


def test_a_file_without_a_persona_is_refused(tmp_path: Path) -> None:
    predictions = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "prompt": "", "reference": "x", "base": "y"}]
    )
    result = rolecast(
        "eval", "--predictions", str(predictions), "--output", str(tmp_path / "e"),
        "--consistency-data", str(predictions),
    )  # fmt: skip
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split())  # out of typer's box
    assert result.returncode == 2 and "give --persona for a file without NAME=" in said
