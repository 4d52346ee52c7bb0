"""`rolecast train --json`: progress and the result as JSON lines, for the programs that follow
a run (the retrain loop); an error as one line too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from formats.lora import TOKENIZER_FILES
from tests.finetune.ft_helpers import dialogue, write_jsonl


def train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rolecast", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_json_lines_report_every_step_and_the_result(
    tiny_llama_dir: Path, small_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = train(
        "--json", "--data", str(small_dataset), "--persona", "haruhi", "--base", str(tiny_llama_dir),
        "--output", str(out), "--max_steps", "3", "--save_steps", "2", "--max_length", "256",
        "--batch_tokens", "512", "--validation_data", str(small_dataset),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]  # nothing else on stdout
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result"
    assert events[0]["step"] == 0 and events[0]["total_steps"] == 3 and events[0]["dialogues"] == 12
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3]
    for e in progress:
        assert e["total_steps"] == 3 and e["loss"] > 0 and e["tokens_per_s"] > 0
        assert e["eta_s"] >= 0 and e["tokens"] > 0
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2]
    assert kinds.index("checkpoint") == kinds.index("progress") + 2  # after step 2
    final = events[-1]
    assert final["adapter"] == str(out)
    assert final["manifest"] == json.loads((out / "rolecast.json").read_text())
    assert final["manifest"]["metrics"]["steps"] == 3
    # the tokenizer is the base model's: none beside the adapter for vLLM to take per LoRA
    assert not {p.name for p in out.iterdir()} & TOKENIZER_FILES


def test_an_error_is_a_json_line_too(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ends = dialogue(1)
    ends["conversations"].append({"from": "human", "value": "然后呢？"})
    data = write_jsonl(tmp_path / "bad.jsonl", [dialogue(0), ends])
    result = train(
        "--json", "--data", str(data), "--persona", "haruhi", "--base", str(tiny_llama_dir),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 1
    (event,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert event["type"] == "error" and "cannot be trained on" in event["message"]
    assert any("row_1" in p and "ends_on_user" in p for p in event["problems"])
    assert "error:" in result.stderr  # and a person still reads it on stderr


def test_help_lists_json() -> None:
    result = train("--help")
    assert result.returncode == 0 and "--json" in result.stdout and "--lora_r" in result.stdout
