"""The `vllm serve` command for a gpt-oss base: the reasoning parser keeps the analysis channel
out of `content` (vLLM itself is not needed: the command is checked, not run)."""

from __future__ import annotations

import json
from pathlib import Path

from serving.settings import ServeSettings
from serving.vllm_launcher import build_vllm_command, model_type
from tests.adapters import fake_lora


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


def test_the_gpt_oss_check_can_serve_the_base_with_lora_off(tmp_path: Path) -> None:
    """`benchmarks/gptoss_vllm.py --check --no-lora` compares the base's replies on a server
    without LoRA: the launcher's command with every LoRA flag and adapter taken out, and
    nothing else changed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gptoss_vllm import without_lora

    base = tmp_path / "gpt-oss-20b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    adapters = {n: str(fake_lora(tmp_path / n, base=str(base))) for n in ("a@v1", "b@v2")}
    settings = ServeSettings(model=str(base), served_model_name="gpt-oss", lora_modules=adapters)
    argv, _ = build_vllm_command(settings, None, str(base))
    assert "--lora-modules" in argv and "--max-lora-rank" in argv
    plain = without_lora([*argv, "--port", "8011"])
    lora_part = argv.index("--enable-lora")  # the launcher puts LoRA last
    assert [a for a in argv[lora_part:] if a.startswith("--")] == [
        "--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras", "--lora-modules"
    ]  # fmt: skip
    assert plain == [*argv[:lora_part], "--port", "8011"]  # what follows the adapters is kept
    assert plain[plain.index("--reasoning-parser") + 1] == "openai_gptoss"
