"""The `vllm serve` command for a gpt-oss base: the reasoning parser keeps the analysis channel
out of `content` (vLLM itself is not needed: the command is checked, not run)."""

from __future__ import annotations

import json
from pathlib import Path

from serving.settings import ServeSettings
from serving.vllm_launcher import build_vllm_command, model_type


def test_a_gpt_oss_base_gets_the_harmony_reasoning_parser(tmp_path: Path) -> None:
    base = tmp_path / "gpt-oss-20b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    settings = ServeSettings(model=str(base), served_model_name="gpt-oss-20b")
    argv, _ = build_vllm_command(settings, None, str(base))
    assert argv[argv.index("--reasoning-parser") + 1] == "openai_gptoss"
    assert "--enable-lora" in argv
    assert model_type("openai/gpt-oss-20b") == "gpt_oss"  # a hub id, by its name


def test_other_bases_get_no_reasoning_parser(tmp_path: Path) -> None:
    base = tmp_path / "llama"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    argv, _ = build_vllm_command(ServeSettings(model=str(base)), None, str(base))
    assert "--reasoning-parser" not in argv
    assert model_type("HuggingFaceTB/SmolLM2-135M-Instruct") is None
