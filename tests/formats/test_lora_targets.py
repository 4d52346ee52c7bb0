"""The servable-LoRA rule per model type: what vLLM 0.26 serves of a gpt-oss adapter."""

from __future__ import annotations

import json
from pathlib import Path

from formats import lora

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_gpt_oss_serves_attention_and_both_fused_expert_weights_in_order() -> None:
    assert lora.target_problems("gpt_oss", {"q_proj", "k_proj", "v_proj", "o_proj"}, EXPERTS) == []
    assert lora.target_problems("gpt_oss", ["q_proj", "v_proj"], None) == []
    (only_one,) = lora.target_problems("gpt_oss", ["q_proj"], EXPERTS[:1])
    assert "gate_up_proj" in only_one and "down_proj" in only_one
    assert lora.target_problems("gpt_oss", ["q_proj"], EXPERTS[::-1])  # vLLM reads the order
    (head,) = lora.target_problems("gpt_oss", ["q_proj", "lm_head", "router"], EXPERTS)
    assert "lm_head" in head and "router" in head


def test_other_models_keep_every_linear_layer_but_no_parameter_targets() -> None:
    assert lora.target_problems("llama", ["q_proj", "gate_proj", "down_proj"], None) == []
    assert lora.target_problems(None, "all-linear", []) == []
    (problem,) = lora.target_problems("qwen3_moe", ["q_proj"], ["mlp.experts.gate_up_proj"])
    assert "gpt_oss" in problem


def test_an_adapter_config_with_unservable_parameter_targets_is_refused(tmp_path: Path) -> None:
    def adapter(name: str, targets: list[str] | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
        if targets is not None:
            config["target_parameters"] = targets
        (path / lora.CONFIG).write_text(json.dumps(config))
        (path / lora.WEIGHTS).write_bytes(b"")
        return path

    assert lora.problems(adapter("experts", EXPERTS)) == []
    assert lora.problems(adapter("none", None)) == []
    (problem,) = lora.problems(adapter("down-only", EXPERTS[1:]))
    assert "target_parameters" in problem
