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
    import torch
    from safetensors.torch import save_file

    def adapter(name: str, targets: list[str] | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
        layer = "base_model.model.model.layers.0"
        tensors = {
            f"{layer}.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
            f"{layer}.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8),
        }
        if targets is not None:
            config["target_parameters"] = targets
            for k, _ in enumerate(targets):  # PEFT's nesting: the first target innermost
                module = f"{layer}.mlp.experts" + ".base_layer" * (len(targets) - 1 - k)
                tensors[f"{module}.lora_A.weight"] = torch.zeros(8 * 4, 64)
                tensors[f"{module}.lora_B.weight"] = torch.zeros(128 if k == 0 else 64, 8 * 4)
        (path / lora.CONFIG).write_text(json.dumps(config))
        save_file(tensors, str(path / lora.WEIGHTS))
        return path

    assert lora.problems(adapter("experts", EXPERTS)) == []
    assert lora.problems(adapter("none", None)) == []
    (problem,) = lora.problems(adapter("down-only", EXPERTS[1:]))
    assert "target_parameters" in problem
    base = {"hidden_size": 64, "intermediate_size": 64, "num_local_experts": 4}
    assert lora.problems(adapter("fits", EXPERTS), base_config=base) == []
    wrong = lora.problems(adapter("eight", EXPERTS), base_config={**base, "num_local_experts": 8})
    assert len(wrong) == 2 and all("stacks 32 ranks, not 8 experts x rank 8" in p for p in wrong)


def test_peft_parameter_lora_modules_are_named_by_their_wrapping_order() -> None:
    from formats.weights import parameter_of

    prefix = "base_model.model.model.layers.3.mlp.experts"
    assert parameter_of(f"{prefix}.base_layer", EXPERTS) == "mlp.experts.gate_up_proj"
    assert parameter_of(prefix, EXPERTS) == "mlp.experts.down_proj"
    assert parameter_of(prefix, EXPERTS[1:]) == "mlp.experts.down_proj"  # one: no base_layer
    assert parameter_of("base_model.model.model.layers.3.self_attn.q_proj", EXPERTS) is None


def test_malformed_target_parameters_are_a_reason_not_an_exception() -> None:
    for value in ("mlp.experts.gate_up_proj", 7, [1, 2], {"a": 1}):
        (problem,) = lora.parameter_target_problems(value)
        assert "target_parameters" in problem
