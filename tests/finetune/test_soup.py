"""Averaging adapters: the soup's update is the mean of its inputs' updates, as one plain LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune.cli import register
from finetune.errors import ConfigError, ModelNotFoundError
from finetune.soup import average_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, r: int, rslora: bool) -> Path:
    """A LoRA on the tiny model with random A *and* B, so its update is not zero."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=r, lora_alpha=8, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    manifest = {"persona": "haruhi", "system_prompt": "你是凉宫春日。", "settings": {"seed": seed}}
    (out / "rolecast.json").write_text(json.dumps(manifest, ensure_ascii=False))
    return out


def merged_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture
def two_adapters(tiny_llama_dir: Path, tmp_path: Path) -> list[Path]:
    # different ranks and scalings: the soup averages the updates, not the factors
    return [
        make_adapter(tiny_llama_dir, tmp_path / "seed1", seed=1, r=4, rslora=True),
        make_adapter(tiny_llama_dir, tmp_path / "seed2", seed=2, r=2, rslora=False),
    ]


def test_soup_update_is_the_mean_of_the_inputs_updates(tiny_llama_dir, two_adapters, tmp_path):  # type: ignore[no-untyped-def]
    manifest = average_adapters(two_adapters, tmp_path / "soup", rank=8)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    first, second = (merged_weights(tiny_llama_dir, a) for a in two_adapters)
    soup = merged_weights(tiny_llama_dir, tmp_path / "soup")
    changed = 0
    for name, w in base.items():
        expected = w + ((first[name] - w) + (second[name] - w)) / 2
        torch.testing.assert_close(soup[name], expected, atol=1e-5, rtol=1e-4)
        changed += not torch.equal(first[name], w)
    assert changed == 2 * len(TARGETS)  # two layers, every target module adapted
    assert manifest["soup"]["retained_energy"] == pytest.approx(1.0)
    assert manifest["soup"]["seeds"] == [1, 2]
    assert manifest["persona"] == "haruhi" and manifest["system_prompt"] == "你是凉宫春日。"
    config = json.loads((tmp_path / "soup" / "adapter_config.json").read_text())
    assert config["r"] == 8 and not config["use_dora"] and not config["modules_to_save"]


def test_a_smaller_rank_keeps_the_best_approximation(tiny_llama_dir, two_adapters, tmp_path):  # type: ignore[no-untyped-def]
    manifest = average_adapters(two_adapters, tmp_path / "soup", rank=2)
    assert manifest["soup"]["rank"] == 2
    assert 0.0 < manifest["soup"]["retained_energy"] < 1.0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    first, second = (merged_weights(tiny_llama_dir, a) for a in two_adapters)
    soup = merged_weights(tiny_llama_dir, tmp_path / "soup")
    name = "model.layers.0.mlp.up_proj.weight"
    mean = ((first[name] - base[name]) + (second[name] - base[name])) / 2
    sigma = torch.linalg.svdvals(mean)
    # Eckart-Young: the rank-2 truncation leaves exactly the discarded singular values
    error = torch.linalg.matrix_norm(soup[name] - base[name] - mean)
    assert float(error) == pytest.approx(float(sigma[2:].square().sum().sqrt()), rel=1e-3)


def test_bad_inputs_are_refused_with_the_reason(tiny_llama_dir, two_adapters, tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="at least two"):
        average_adapters(two_adapters[:1], tmp_path / "soup")
    with pytest.raises(ConfigError, match="rank must be at least 1"):
        average_adapters(two_adapters, tmp_path / "soup", rank=0)
    with pytest.raises(ModelNotFoundError, match="not an adapter directory"):
        average_adapters([two_adapters[0], tmp_path], tmp_path / "soup")
    config_path = two_adapters[1] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "another/model"}))
    with pytest.raises(ConfigError, match="different base models"):
        average_adapters(two_adapters, tmp_path / "soup")
    assert not (tmp_path / "soup").exists()  # nothing half-written


def test_soup_command(two_adapters, tmp_path):  # type: ignore[no-untyped-def]
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "soup"
    result = runner.invoke(app, ["soup", *map(str, two_adapters), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank 4" in result.output  # the inputs' largest rank; ranks 4 + 2 do not all fit
    assert "100.00%" not in result.output
    args = ["soup", *map(str, two_adapters), "--output", str(out), "--rank", "6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "100.00% of the averaged update kept" in result.output
    result = runner.invoke(app, ["soup", str(two_adapters[0]), "--output", str(out)])
    assert result.exit_code == 1 and "at least two" in result.output
