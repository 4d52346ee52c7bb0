"""The servable-LoRA rule: one function, every reason at once, the same for every checker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formats import lora
from tests.adapters import lora_tensors, safetensors_bytes


def adapter(
    path: Path, weights: bool = True, manifest: dict | None = None, **config: object
) -> Path:
    path.mkdir(parents=True)
    base = {
        "peft_type": "LORA",
        "r": 8,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    (path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if weights:
        rank = config.get("r", 8)
        tensors = lora_tensors(rank if isinstance(rank, int) and rank > 0 else 8)
        (path / "adapter_model.safetensors").write_bytes(safetensors_bytes(tensors))
    if manifest is not None:
        (path / "rolecast.json").write_text(json.dumps(manifest))
    return path


def test_a_plain_lora_is_servable(tmp_path: Path) -> None:
    good = adapter(tmp_path / "good")
    assert lora.problems(good) == []
    assert lora.problems(good, max_rank=8, base_model="/models/SmolLM2-135M-Instruct") == []


def test_every_reason_is_given(tmp_path: Path) -> None:
    bad = adapter(
        tmp_path / "bad",
        weights=False,
        manifest={"base_model": "meta-llama/Llama-3.1-8B-Instruct"},
        peft_type="IA3",
        r=16,
        rank_pattern={"q_proj": 128},
        modules_to_save=["lm_head"],
        use_dora=True,
    )
    found = lora.problems(bad, max_rank=64, base_model="SmolLM2-135M-Instruct")
    assert found == [
        "peft_type is IA3; only LORA adapters can be served",
        "LoRA rank 128 is greater than max_lora_rank 64",
        'modules_to_save is set (["lm_head"]); vLLM cannot serve full copies of modules: '
        "train without modules_to_save",
        "use_dora is true; vLLM does not serve DoRA adapters",
        "adapter_model.safetensors is missing",
        "base model differs: the adapter was trained on 'meta-llama/Llama-3.1-8B-Instruct', "
        "the server runs 'SmolLM2-135M-Instruct'",
    ]
    # with no server limits (as when training ends), only what no server could serve
    assert len(lora.problems(bad)) == 4


def test_ranks_vllm_allows(tmp_path: Path) -> None:
    assert lora.problems(adapter(tmp_path / "big", r=1024), max_rank=2048) == [
        "LoRA rank 1024 is above vLLM's largest max_lora_rank 512"
    ]
    assert [lora.allowed_rank(r) for r in (1, 2, 8, 9, 33, 300, 500)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        lora.allowed_rank(513)


def test_not_an_adapter(tmp_path: Path) -> None:
    assert lora.problems(tmp_path) == [f"{tmp_path} is not a PEFT adapter: no adapter_config.json"]
    (tmp_path / "adapter_config.json").write_text("{")
    assert "is not valid JSON" in lora.problems(tmp_path)[0]
